"""`qywx-ray doctor` against real services: the shared Kafka and Redis, a local Sentinel
setup, the session's Ray; and against addresses where nothing listens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib
from pydantic import SecretStr

from qywx_ray.devstack.procs import free_port
from qywx_ray.devstack.sentinel import SentinelCluster
from qywx_ray.doctor import Check, _wecom_check, format_checks, main_doctor, run_doctor
from qywx_ray.kafka.topics import ensure_topics
from qywx_ray.settings import Settings


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.mark.integration
def test_healthy_development_stack(
    make_settings: Callable[..., Settings], ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    ensure_topics(settings.kafka)
    checks = _by_name(run_doctor(settings))
    main, dlq = settings.kafka.main_topic.name, settings.kafka.dlq_topic.name
    assert checks["kafka.brokers"].ok
    assert "broker(s) live" in checks["kafka.brokers"].detail
    assert checks[f"kafka.topic.{main}"].ok, checks[f"kafka.topic.{main}"]
    assert "4 partitions, rf 1" in checks[f"kafka.topic.{main}"].detail
    assert checks[f"kafka.topic.{dlq}"].ok
    assert checks["redis"].ok
    assert "role master" in checks["redis"].detail
    assert checks["ray"].ok
    assert "node(s)" in checks["ray"].detail
    # development runs on the demo credentials: allowed, but flagged
    assert checks["wecom.credentials"].ok
    assert checks["wecom.credentials"].warn
    assert main_doctor(settings) == 0
    out = capsys.readouterr().out
    assert "[OK  ] kafka.brokers" in out
    assert "[WARN] wecom.credentials" in out
    assert settings.wecom.encoding_aes_key.get_secret_value() not in out  # no secret printed


@pytest.mark.integration
def test_reports_missing_and_mismatched_topics(
    make_settings: Callable[..., Settings], ray_session: None
) -> None:
    settings = make_settings()
    other = make_settings(
        kafka={"main_topic": {"name": settings.kafka.main_topic.name, "partitions": 2}}
    )
    ensure_topics(other.kafka)  # main topic exists with 2 partitions; the profile wants 4
    checks = _by_name(run_doctor(settings))
    main = checks[f"kafka.topic.{settings.kafka.main_topic.name}"]
    assert not main.ok
    assert "has 2 partitions, profile wants 4" in main.detail
    dlq = checks[f"kafka.topic.{settings.kafka.dlq_topic.name}"]
    assert dlq.ok  # created by ensure_topics above with the same DLQ spec
    suffix = settings.kafka.main_topic.name + "-absent"
    missing = make_settings(
        kafka={"main_topic": {"name": suffix}, "dlq_topic": {"name": suffix + "-dlq"}}
    )
    checks = _by_name(run_doctor(missing))
    topic = checks[f"kafka.topic.{missing.kafka.main_topic.name}"]
    assert not topic.ok
    assert topic.detail == "missing"
    assert "topics ensure" in topic.fix


@pytest.mark.integration
def test_unreachable_services_fail_fast_with_fixes(
    make_settings: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    dead_kafka, dead_redis, dead_ray = free_port(), free_port(), free_port()
    settings = make_settings(
        kafka={"bootstrap_servers": f"127.0.0.1:{dead_kafka}"},
        redis={"url": f"redis://127.0.0.1:{dead_redis}/0", "socket_timeout_s": 1.0},
    )
    checks = _by_name(run_doctor(settings, ray_address=f"127.0.0.1:{dead_ray}", timeout_s=3.0))
    assert not checks["kafka.brokers"].ok
    assert "bootstrap_servers" in checks["kafka.brokers"].fix
    assert not checks["kafka.topics"].ok
    assert not checks["redis"].ok
    assert "ConnectionError" in checks["redis"].detail
    ray_check = checks["ray"]
    assert not ray_check.ok
    assert "not running: nothing listens at" in ray_check.detail
    assert ray_check.detail.endswith(f":{dead_ray}")  # Ray resolves 127.0.0.1 to the node IP
    assert "ray start --head" in ray_check.fix


@pytest.mark.integration
def test_sentinel_mode_reports_master_replicas_and_failover(
    make_settings: Callable[..., Settings], ray_session: None, tmp_path: Path
) -> None:
    with SentinelCluster(tmp_path / "sentinel", min_replicas_to_write=1) as cluster:
        settings = make_settings(
            redis={
                "mode": "sentinel",
                "sentinel_addrs": cluster.sentinel_addrs,
                "master_name": cluster.master_name,
            }
        )
        host, port = cluster.master()
        master = redis_lib.Redis(host=host, port=port)
        master.config_set("min-replicas-to-write", 0)  # the failover-unsafe default: flagged
        unsafe = _by_name(run_doctor(settings))["redis"]
        assert unsafe.ok
        assert unsafe.warn
        assert "min-replicas-to-write is 0" in unsafe.detail
        master.config_set("min-replicas-to-write", 1)
        master.close()
        checks = _by_name(run_doctor(settings))
        sentinel = checks["redis.sentinel"]
        assert sentinel.ok, sentinel
        assert not sentinel.warn, sentinel
        assert f"3/3 sentinels answer for 'qywxmaster'; master {host}:{port}" in sentinel.detail
        redis_check = checks["redis"]
        assert redis_check.ok, redis_check
        assert not redis_check.warn, redis_check
        assert "role master, 1 replica(s) connected" in redis_check.detail

        new_host, new_port = cluster.kill_master()
        checks = _by_name(run_doctor(settings))
        assert f"master {new_host}:{new_port}" in checks["redis.sentinel"].detail
        redis_check = checks["redis"]  # the promoted master has no replica left: flagged
        assert redis_check.ok, redis_check
        assert redis_check.warn, redis_check
        assert "role master, 0 replica(s) connected" in redis_check.detail


def test_wecom_credentials_are_judged_without_printing_them(
    make_settings: Callable[..., Settings],
) -> None:
    dev = make_settings()
    prod = dev.model_copy(update={"profile": "production"})
    check = _wecom_check(prod)
    assert not check.ok
    assert "demo values" in check.detail

    good_key = "Z" * 43
    real = dev.wecom.model_copy(
        update={
            "corp_id": "ww0123456789abcdef",
            "token": SecretStr("T0ken123"),
            "encoding_aes_key": SecretStr(good_key),
            "kf_secret": SecretStr("s3cr3t-value"),
        }
    )
    check = _wecom_check(prod.model_copy(update={"wecom": real}))
    assert check.ok, check
    assert not check.warn, check
    assert good_key not in format_checks([check])
    assert "s3cr3t" not in format_checks([check])

    short = real.model_copy(update={"encoding_aes_key": SecretStr("tooshort"), "corp_id": ""})
    check = _wecom_check(prod.model_copy(update={"wecom": short}))
    assert not check.ok
    assert "43 base64 characters (has 8)" in check.detail
    assert "corp_id is empty" in check.detail
    assert "tooshort" not in check.detail

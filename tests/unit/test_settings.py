"""Settings: profiles as the original design's tables, env overrides, precise errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qywx_ray.errors import ConfigError
from qywx_ray.kafka.topics import check_topic_settings, diff_existing, unserved
from qywx_ray.settings import load_settings


def test_development_profile_matches_seed_table() -> None:
    s = load_settings(profile="development")
    main, dlq = s.kafka.main_topic, s.kafka.dlq_topic
    assert (main.name, main.partitions, main.replication_factor, main.min_insync_replicas) == (
        "qywx-chat-messages",
        4,
        1,
        1,
    )
    assert (dlq.name, dlq.partitions, dlq.replication_factor, dlq.min_insync_replicas) == (
        "qywx-dead-letter-queue",
        2,
        1,
        1,
    )
    assert main.retention_ms == 7 * 24 * 3600 * 1000
    assert main.compression_type == "lz4"
    assert main.max_message_bytes == 1024 * 1024
    assert s.redis.mode == "single"


def test_production_profile_matches_seed_table() -> None:
    s = load_settings(profile="production", allow_default_secrets=True)
    main, dlq = s.kafka.main_topic, s.kafka.dlq_topic
    assert (main.partitions, main.replication_factor, main.min_insync_replicas) == (12, 3, 2)
    assert (dlq.partitions, dlq.replication_factor, dlq.min_insync_replicas) == (6, 3, 2)
    assert s.redis.mode == "sentinel"
    assert len(s.redis.sentinel_addrs) == 3


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QYWX_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("QYWX_CONSUME__NUM_HOSTS", "7")
    s = load_settings(profile="development")
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert s.consume.num_hosts == 7
    assert s.kafka.main_topic.partitions == 4  # the rest of the file still applies


def test_qywx_config_points_at_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  bootstrap_servers: 'x:1'\n")
    monkeypatch.setenv("QYWX_CONFIG", str(cfg))
    assert load_settings().kafka.bootstrap_servers == "x:1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kafka: [1, 2", "not valid YAML"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("consume:\n  mode: sideways\n", "consume.mode"),
        (
            "kafka:\n  main_topic:\n    name: x\n    partitions: 0\n    replication_factor: 1\n"
            "    min_insync_replicas: 1\n",
            "kafka.main_topic.partitions",
        ),
        ("nonsense_key: 1\n", "nonsense_key"),
        ("redis:\n  mode: sentinel\n  sentinel_addrs: []\n", "sentinel_addrs"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_topic_checks_are_precise() -> None:
    prod = load_settings(profile="production", allow_default_secrets=True).kafka.main_topic
    assert check_topic_settings(prod, brokers=3) == []
    (problem,) = check_topic_settings(prod, brokers=1)
    assert "replication_factor=3 but only 1 broker(s)" in problem
    diffs = diff_existing(prod, 6, 3, {**prod.topic_configs(), "retention.ms": "1"})
    assert any("has 6 partitions, profile wants 12 (fewer" in d for d in diffs)
    assert any("retention.ms=1, profile wants 604800000" in d for d in diffs)
    assert diff_existing(prod, 12, 3, prod.topic_configs()) == []


def test_a_created_topic_counts_as_served_only_whole_and_led() -> None:
    """ensure_topics waits for this: a consumer subscribing to a topic its broker does not
    serve yet would pick it up only at its next metadata refresh."""
    from types import SimpleNamespace as NS

    def md(**topics: object) -> Any:
        return NS(topics=topics)

    def topic(*leaders: int, error: object = None) -> object:
        return NS(error=error, partitions={i: NS(leader=lead) for i, lead in enumerate(leaders)})

    want = {"main": 2, "dlq": 1}
    assert unserved(md(main=topic(1, 1), dlq=topic(1)), want) == []
    assert unserved(md(main=topic(1, 1)), want) == ["dlq"]  # not known yet
    assert unserved(md(main=topic(1), dlq=topic(1)), want) == ["main"]  # partitions missing
    assert unserved(md(main=topic(1, -1), dlq=topic(1)), want) == ["main"]  # no leader yet
    assert unserved(md(main=topic(1, 1), dlq=topic(1, error="UNKNOWN")), want) == ["dlq"]


def test_consumers_refresh_topic_metadata_often_and_bounded() -> None:
    from qywx_ray.kafka.config import consumer_config

    s = load_settings(profile="development")
    assert consumer_config(s.kafka)["topic.metadata.refresh.interval.ms"] == 30_000
    with pytest.raises(ConfigError):
        load_settings(
            profile="development",
            overrides={"kafka": {"consumer": {"metadata_refresh_interval_ms": 0}}},
        )


def test_admin_operators_one_token_each() -> None:
    """Issue 16.10: operators are named by their token; a shared or short token would make
    the audit identity ambiguous or guessable, so configuration refuses it."""
    from pydantic import SecretStr, ValidationError

    from qywx_ray.admin.settings import AdminSettings

    ok = AdminSettings(
        token=SecretStr("main-token-main-token"),
        operators={"bob": SecretStr("b" * 24), "carol": SecretStr("c" * 24)},
    )
    assert [name for name, _ in ok.credentials()] == ["admin", "bob", "carol"]
    for bad in (
        {"bob": SecretStr("x" * 24), "carol": SecretStr("x" * 24)},  # shared token
        {"bob": SecretStr("short")},
        {"bad name\n": SecretStr("d" * 24)},
        {"admin": SecretStr("e" * 24)},  # the single token's name
        {"bob": SecretStr("main-token-main-token")},  # same as the single token
    ):
        with pytest.raises(ValidationError):
            AdminSettings(token=SecretStr("main-token-main-token"), operators=bad)

"""`ray up` for real: deploy/cluster.local.yaml (cluster.yaml's file mounts, setup, env and
start commands; Ray's `local` provider) on a loopback SSH node of this machine.

The drill: our own Kafka and Redis; the node (`tests/drills/sshnode.py`: an unprivileged
user, our own sshd on a free loopback port, a throwaway key); then, from the repository
root, as an operator would:
  ray up -y  ->  ray exec 'qywx-ray doctor'  ->  ray exec 'qywx-ray topics ensure'
  ->  ray exec 'qywx-ray start ...'  ->  messages produced to Kafka are processed on the
  node's Ray, per user in order  ->  ray exec 'qywx-ray stop'  ->  ray down -y
and prints one line `rayup drill: {json}` with each step's exit code and time. Every
process it starts is stopped by PID (sshd, Kafka, Redis) or, for the node's Ray, by the
node's own `ray stop` (it can only signal the node user's processes) and then by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
import yaml

from qywx_ray.devstack.kafka import KafkaCluster
from qywx_ray.devstack.procs import free_port, pid_alive, wait_until
from qywx_ray.devstack.redis import RedisServer
from qywx_ray.settings import load_settings
from qywx_ray.testing.consume import check_order, envelopes, produce, records
from tests.drills.sshnode import NODE_USER, LoopbackSshd, NodeUser, install_missing_packages

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
LOCAL_YAML = ROOT / "deploy" / "cluster.local.yaml"
RECORD = "qywx:drill:rayup"
# The ports cluster.local.yaml names, replaced by free ones in the rendered copy.
LOCAL_PORTS = ("6390", "8077", "8090")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeUser, LoopbackSshd]]:
    if os.geteuid() != 0:
        pytest.skip("the drill creates a user and runs sshd: needs root")
    installed = install_missing_packages()
    print(f"rayup drill: installed {installed or 'nothing (all present)'}")
    user = NodeUser(ray_tmpdir=tempfile.mkdtemp(prefix="qywx-node-", dir="/tmp"))
    sshd: LoopbackSshd | None = None
    try:
        user.prepare()
        sshd = LoopbackSshd(tmp_path / "sshd", home=user.home).start()
        yield user, sshd
    finally:
        if sshd is not None:
            sshd.stop()
        user.cleanup()


def _render(sshd: LoopbackSshd, out: Path) -> tuple[Path, dict[str, int]]:
    text = LOCAL_YAML.read_text()
    ports = {p: free_port() for p in LOCAL_PORTS}
    for old, new in ports.items():
        text = text.replace(old, str(new))
    cfg = yaml.safe_load(text)
    cfg["cluster_name"] = f"qywx-local-{uuid.uuid4().hex[:6]}"
    cfg["auth"] = {
        "ssh_user": NODE_USER,
        "ssh_private_key": str(sshd.client_key),
        "ssh_proxy_command": sshd.proxy_command(),
    }
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out, ports


def _node_env(bootstrap: str, redis_url: str, tag: str) -> str:
    """~/qywx.env as a secret manager would write it: the production profile pointed at
    this drill's Kafka (1 broker: RF 1) and Redis (single), fresh secrets."""
    env = {
        "QYWX_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "QYWX_KAFKA__MAIN_TOPIC__NAME": f"ru-main-{tag}",
        "QYWX_KAFKA__MAIN_TOPIC__PARTITIONS": "4",
        "QYWX_KAFKA__MAIN_TOPIC__REPLICATION_FACTOR": "1",
        "QYWX_KAFKA__MAIN_TOPIC__MIN_INSYNC_REPLICAS": "1",
        "QYWX_KAFKA__DLQ_TOPIC__NAME": f"ru-dlq-{tag}",
        "QYWX_KAFKA__DLQ_TOPIC__PARTITIONS": "2",
        "QYWX_KAFKA__DLQ_TOPIC__REPLICATION_FACTOR": "1",
        "QYWX_KAFKA__DLQ_TOPIC__MIN_INSYNC_REPLICAS": "1",
        "QYWX_REDIS__MODE": "single",
        "QYWX_REDIS__URL": redis_url,
        "QYWX_CONSUME__NUM_CONSUMERS": "2",
        "QYWX_CONSUME__NUM_HOSTS": "2",
        "QYWX_INGEST__NUM_SYNCER_HOSTS": "1",
        "QYWX_CONSUME__HANDLER": "qywx_ray.testing.handlers:recording_handler",
        "QYWX_CONSUME__RECORD_KEY": RECORD,
        "QYWX_WECOM__CORP_ID": f"ww{secrets.token_hex(8)}",
        "QYWX_WECOM__TOKEN": secrets.token_hex(16),
        "QYWX_WECOM__ENCODING_AES_KEY": secrets.token_urlsafe(32)[:43]
        .replace("-", "a")
        .replace("_", "b"),
        "QYWX_WECOM__KF_SECRET": secrets.token_hex(16),
        "QYWX_ADMIN__TOKEN": secrets.token_hex(32),
    }
    return "".join(f"{k}={v}\n" for k, v in env.items())


def _ray(
    args: list[str], log: list[dict[str, Any]], env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    t0 = time.monotonic()
    res = subprocess.run(
        ["ray", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    label = args[0] if args[0] != "exec" else f"exec '{args[2]}'"
    step: dict[str, Any] = {"step": label, "rc": res.returncode}
    step["s"] = round(time.monotonic() - t0, 1)
    log.append(step)
    print(f"\n$ ray {' '.join(args)}  -> rc={res.returncode} in {step['s']} s")
    print(res.stdout[-3000:])
    if res.returncode:
        print(res.stderr[-3000:])
    return res


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _decoy_raylet(workdir: Path) -> subprocess.Popen[bytes]:
    """A root process named `raylet`: `ray stop` (which `ray up`/`ray down` run on the
    node) kills processes by that name. Run as the node user it must not be able to."""
    decoy = workdir / "raylet"
    shutil.copy("/bin/sleep", decoy)
    return subprocess.Popen([str(decoy), "3600"], start_new_session=True)


def test_ray_up_local_provider_end_to_end(
    node: tuple[NodeUser, LoopbackSshd], tmp_path: Path
) -> None:
    user, sshd = node
    tag = uuid.uuid4().hex[:6]
    kafka = KafkaCluster(tmp_path / "kafka", brokers=1, ports=[free_port()], heap_mb=384).start()
    redis_srv = RedisServer(tmp_path / "redis").start()
    steps: list[dict[str, Any]] = []
    decoy = _decoy_raylet(tmp_path)
    cfg, ports = _render(sshd, tmp_path / "cluster.local.rendered.yaml")
    # The operator's side of ray up keeps its own files apart too.
    local_tmp = tempfile.mkdtemp(prefix="qywx-rup-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": local_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    report: dict[str, Any] = {"drill": "ray_up_local", "ports": ports}
    try:
        # The secret manager's part: ~/qywx.env on the node before `ray up`.
        node_env = user.home / "qywx.env"
        node_env.write_text(_node_env(kafka.bootstrap_servers, redis_srv.url, tag))
        node_env.chmod(0o600)
        shutil.chown(node_env, NODE_USER, NODE_USER)

        up = _ray(["up", "-y", str(cfg), "--no-config-cache"], steps, env, 1200)
        assert up.returncode == 0, "ray up failed"
        doctor = _ray(["exec", str(cfg), "qywx-ray doctor"], steps, env, 300)
        report["doctor_before_topics"] = doctor.stdout.strip().splitlines()[-12:]
        ensure = _ray(["exec", str(cfg), "qywx-ray topics ensure"], steps, env, 300)
        assert ensure.returncode == 0, ensure.stdout
        assert f"ru-main-{tag}" in ensure.stdout, ensure.stdout
        http_port = free_port()
        start_cmd = f"qywx-ray start --http-host 127.0.0.1 --http-port {http_port}"
        start = _ray(["exec", str(cfg), start_cmd], steps, env, 600)
        assert start.returncode == 0, "qywx-ray start failed"
        # The ingress `qywx-ray start` served on the node answers (production: a status word).
        ready: dict[str, Any] = {}

        def ingress_ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=5)
                ready.update(code=r.status_code, body=r.text[:200])
                return r.status_code == 200
            return False

        wait_until(ingress_ready, timeout_s=120, what="the node's ingress /readyz", interval_s=1)
        report["ingress_readyz"] = ready
        doctor2 = _ray(["exec", str(cfg), "qywx-ray doctor"], steps, env, 300)
        report["doctor_after_start"] = doctor2.stdout.strip().splitlines()[-12:]

        # Messages flow: produced to the node's topic, processed on the node's Ray.
        settings = load_settings(
            profile="development",
            overrides={
                "kafka": {
                    "bootstrap_servers": kafka.bootstrap_servers,
                    "main_topic": {"name": f"ru-main-{tag}", "partitions": 4},
                }
            },
        )
        # 3 messages per customer: under the production profile's rate limit (5 per 10 s),
        # which this drill keeps (more would be dead-lettered and retried later, by design).
        msgs = envelopes(20, 3, prefix=f"ru{tag}-")
        produce(settings, msgs)
        client = redis_lib.Redis.from_url(redis_srv.url)
        t0 = time.monotonic()
        wait_until(
            lambda: client.llen(RECORD) >= len(msgs), timeout_s=240, what="messages processed"
        )
        order = check_order(records(client, RECORD), msgs)
        report.update(
            messages=len(msgs),
            processed_after_s=round(time.monotonic() - t0, 1),
            lost=len(order.missing),
            reordered=order.inversions,
            duplicates=order.duplicates,
        )
        assert order.missing == []
        assert order.inversions == 0
        assert order.duplicates == 0
        stop = _ray(["exec", str(cfg), "qywx-ray stop"], steps, env, 300)
        assert stop.returncode == 0
    finally:
        down = _ray(["down", "-y", str(cfg)], steps, env, 300)
        report["steps"] = steps
        left = [p for p in user.pids() if pid_alive(p)]
        report["node_processes_after_down"] = sorted(_comm(p) for p in left)
        print(f"\nrayup drill: {json.dumps(report)}")
        decoy_survived = decoy.poll() is None
        decoy.kill()
        decoy.wait(timeout=10)
        kafka.stop()
        redis_srv.stop()
        shutil.rmtree(local_tmp, ignore_errors=True)
    assert down.returncode == 0
    assert decoy_survived, "the node's `ray stop` killed a root process named raylet"
    assert report["doctor_after_start"], "doctor printed nothing"

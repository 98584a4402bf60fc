"""`qywx-ray doctor`: is this deployment able to run? Checks Kafka, topics, Redis, Ray, WeCom.

Every check is read-only and bounded in time: it never creates or alters a topic, never
writes to Redis, never starts Ray and never calls WeCom. Secrets are judged (length,
alphabet, demo defaults) but never printed. Each Check says what was found and, when it
is not ok, the command or setting that fixes it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from qywx_ray.kafka.config import admin_config
from qywx_ray.kafka.settings import TopicSettings
from qywx_ray.kafka.topics import check_topic_settings, describe_topic, diff_existing
from qywx_ray.secret_policy import is_enforced, secret_findings
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_redis, redis_address
from qywx_ray.store.settings import RedisSettings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # ok, but worth a look (e.g. no Redis replica)

    @property
    def status(self) -> str:
        return "FAIL" if not self.ok else ("WARN" if self.warn else "OK")


# ---- Kafka -------------------------------------------------------------------------------


def _kafka_checks(settings: Settings, timeout_s: float) -> list[Check]:
    kafka = settings.kafka
    admin = AdminClient(admin_config(kafka))
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        return [
            Check(
                "kafka.brokers",
                False,
                f"cannot reach {kafka.bootstrap_servers} within {timeout_s:.0f}s: {exc}",
                "start Kafka (`qywx-ray dev up` locally) or fix kafka.bootstrap_servers / "
                "QYWX_KAFKA__BOOTSTRAP_SERVERS",
            ),
            Check("kafka.topics", False, "skipped: Kafka unreachable"),
        ]
    brokers = sorted(f"{b.id}@{b.host}:{b.port}" for b in md.brokers.values())
    specs = [kafka.main_topic, kafka.dlq_topic]
    too_few = [p for s in specs for p in check_topic_settings(s, len(brokers))]
    checks = [
        Check(
            "kafka.brokers",
            not too_few,
            f"{len(brokers)} broker(s) live: {', '.join(brokers)}"
            + (f"; {'; '.join(too_few)}" if too_few else ""),
            "" if not too_few else "start more brokers or use the development profile",
        )
    ]
    for spec in specs:
        checks.append(_topic_check(admin, md, spec, timeout_s))
    return checks


def _topic_check(admin: AdminClient, md: Any, spec: TopicSettings, timeout_s: float) -> Check:
    name = f"kafka.topic.{spec.name}"
    if spec.name not in md.topics:
        return Check(name, False, "missing", "qywx-ray topics ensure")
    try:
        partitions, rf, configs = describe_topic(admin, spec.name, timeout_s)
    except KafkaException as exc:
        return Check(name, False, f"cannot describe: {exc}")
    diffs = diff_existing(spec, partitions, rf, configs)
    if diffs:
        return Check(
            name,
            False,
            "; ".join(diffs),
            "the topic differs from the profile: fix the profile, or recreate the topic "
            "(changing partitions moves users to other partitions)",
        )
    under = sorted(
        p.id for p in md.topics[spec.name].partitions.values() if len(p.isrs) < len(p.replicas)
    )
    below_min = sorted(
        p.id
        for p in md.topics[spec.name].partitions.values()
        if len(p.isrs) < spec.min_insync_replicas
    )
    detail = f"{partitions} partitions, rf {rf}, min.insync.replicas {spec.min_insync_replicas}"
    if below_min:
        return Check(
            name,
            False,
            f"{detail}; partitions {below_min} have fewer in-sync replicas than "
            "min.insync.replicas: writes to them fail",
            "bring the missing brokers back",
        )
    if under:
        return Check(name, True, f"{detail}; under-replicated partitions {under}", warn=True)
    return Check(name, True, detail)


# ---- Redis -------------------------------------------------------------------------------


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redis_checks(rs: RedisSettings, timeout_s: float) -> list[Check]:
    where = redis_address(rs)
    if rs.mode == "sentinel":
        sentinel = _sentinel_check(rs, timeout_s)
        if not sentinel.ok:
            return [sentinel]
        return [sentinel, _redis_master_check(rs, where, timeout_s)]
    return [_redis_master_check(rs, where, timeout_s)]


def _min_replicas_to_write(client: redis.Redis) -> int | None:
    """None when the server hides CONFIG (managed Redis services often do)."""
    try:
        got: dict[Any, Any] = client.config_get("min-replicas-to-write")
    except redis.ResponseError:
        return None
    value = got.get("min-replicas-to-write", got.get(b"min-replicas-to-write", 0))
    return int(_s(value))


def _redis_master_check(rs: RedisSettings, where: str, timeout_s: float) -> Check:
    # One try, bounded: the client's failover retries would make a dead Redis cost ~10 s.
    bounded = rs.model_copy(
        update={"socket_timeout_s": min(rs.socket_timeout_s, timeout_s), "retry_budget_s": 0.0}
    )
    client = make_redis(bounded)
    try:
        client.ping()
        server = client.info("server")
        repl = client.info("replication")
        min_replicas = _min_replicas_to_write(client)
    except redis.RedisError as exc:
        return Check(
            "redis",
            False,
            f"{rs.mode} {where}: {type(exc).__name__}: {exc}",
            "start Redis (`qywx-ray dev up`) or fix redis.url / redis.sentinel_addrs",
        )
    finally:
        client.close()
    role = repl.get("role")
    replicas = int(repl.get("connected_slaves", 0))
    detail = (
        f"{rs.mode} {where}: redis {server.get('redis_version')}, role {role}, "
        f"{replicas} replica(s) connected"
    )
    if role != "master":
        return Check("redis", False, detail, "writes need the master: point at the master")
    if rs.mode == "sentinel" and replicas == 0:
        return Check(
            "redis",
            True,
            detail + " - no replica: a master failure would lose data and stop writes",
            "start a replica (or restart the failed old master; sentinels re-attach it)",
            warn=True,
        )
    if rs.mode == "sentinel" and min_replicas == 0:
        return Check(
            "redis",
            True,
            detail + " - min-replicas-to-write is 0: writes the old master takes during a"
            " failover are thrown away when it rejoins (done-flags, cursors, parking)",
            "set `min-replicas-to-write 1`, `min-replicas-max-lag 2` on every Redis node, with"
            " at least 2 replicas (docker-compose.yml shows it)",
            warn=True,
        )
    return Check("redis", True, detail)


def _sentinel_check(rs: RedisSettings, timeout_s: float) -> Check:
    """Sentinel quorum and agreement on the master (replica health is the master's view)."""
    views: dict[str, tuple[str, int] | None] = {}
    for addr in rs.sentinel_addrs:
        host, _, port = addr.rpartition(":")
        client = redis.Redis(
            host=host or "127.0.0.1",
            port=int(port),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            password=rs.password or None,
        )
        try:
            master = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", rs.master_name)
            views[addr] = (_s(master[0]), int(master[1])) if master else None
        except (redis.RedisError, ValueError):
            views[addr] = None
        finally:
            client.close()
    reachable = {a: v for a, v in views.items() if v is not None}
    masters = set(reachable.values())
    quorum = len(rs.sentinel_addrs) // 2 + 1
    summary = f"{len(reachable)}/{len(rs.sentinel_addrs)} sentinels answer for '{rs.master_name}'"
    if len(reachable) < quorum:
        return Check(
            "redis.sentinel",
            False,
            summary + f" (a failover needs {quorum})",
            "start the sentinels or fix redis.sentinel_addrs / redis.master_name",
        )
    if len(masters) != 1:
        return Check("redis.sentinel", False, f"{summary}; they disagree: {sorted(masters)}")
    master_host, master_port = masters.pop()
    detail = f"{summary}; master {master_host}:{master_port}"
    if len(reachable) < len(rs.sentinel_addrs):
        down = sorted(a for a in views if views[a] is None)
        return Check(
            "redis.sentinel",
            True,
            f"{detail}; not answering: {', '.join(down)}",
            "restart the missing sentinels",
            warn=True,
        )
    return Check("redis.sentinel", True, detail)


def _pairs(raw: object) -> dict[str, str]:
    if isinstance(raw, dict):
        return {_s(k): _s(v) for k, v in raw.items()}
    items = list(raw) if isinstance(raw, list | tuple) else []
    return {_s(items[i]): _s(items[i + 1]) for i in range(0, len(items) - 1, 2)}


# ---- Ray ---------------------------------------------------------------------------------

_RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False,
         configure_logging=False)
alive = [n for n in ray.nodes() if n["Alive"]]
from qywx_ray.placement import actor_nodes
actors = actor_nodes(sys.argv[2], timeout_s=float(sys.argv[3]))
print(json.dumps({"nodes": len(alive), "cpus": ray.cluster_resources().get("CPU", 0),
                  "version": ray.__version__, "actors": actors}))
ray.shutdown()
"""


def _actors_check(namespace: str, rows: list[dict[str, Any]]) -> Check:
    """Which node each of our named actors runs on (reported by the actor itself)."""
    from qywx_ray.placement import format_actor_nodes

    if not rows:
        return Check("ray.actors", True, f"none in namespace {namespace} (not started)")
    silent = [r["name"] for r in rows if r["node_id"] is None]
    nodes = {r["node_id"] for r in rows if r["node_id"]}
    detail = f"{len(rows)} on {len(nodes)} node(s): {format_actor_nodes(rows)}"
    if silent:
        return Check(
            "ray.actors",
            False,
            detail,
            "actors that did not answer may be restarting: check `ray list actors`",
        )
    return Check("ray.actors", True, detail)


def _tcp_open(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _ray_check(address: str | None, timeout_s: float, namespace: str) -> list[Check]:
    """An explicit address is always probed; otherwise an existing connection is reused."""
    import ray

    if address is None and ray.is_initialized():
        from qywx_ray.placement import actor_nodes

        alive = [n for n in ray.nodes() if n["Alive"]]
        cpus = ray.cluster_resources().get("CPU", 0)
        return [
            Check("ray", True, f"connected: {len(alive)} node(s), {cpus:g} CPU"),
            _actors_check(namespace, actor_nodes(namespace, timeout_s=timeout_s)),
        ]
    return [_ray_probe(address, timeout_s, namespace)]


def _ray_probe(address: str | None, timeout_s: float, namespace: str) -> Check:
    from ray._private.services import canonicalize_bootstrap_address

    fix = "start Ray: `ray start --head` (one machine) or `ray up cluster.yaml`; or set RAY_ADDRESS"
    wanted = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        resolved = canonicalize_bootstrap_address(wanted)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError/ValueError for bad addresses
        return Check("ray", False, f"not running: {exc}", fix)
    if resolved is None:
        return Check("ray", False, f"not running: no Ray cluster found ({wanted})", fix)
    host, _, port = resolved.rpartition(":")
    if not _tcp_open(host, int(port), min(timeout_s, 3.0)):
        return Check("ray", False, f"not running: nothing listens at {resolved}", fix)
    try:
        res = subprocess.run(
            [sys.executable, "-c", _RAY_PROBE, resolved, namespace, str(timeout_s)],
            capture_output=True,
            text=True,
            timeout=timeout_s + 15.0,  # a fresh Python importing Ray needs seconds
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Check("ray", False, f"{resolved} did not answer in time", fix)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return Check("ray", False, f"{resolved}: cannot connect: {last}", fix)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    actors = _actors_check(namespace, info.get("actors", []))
    return Check(
        "ray",
        actors.ok,
        f"{resolved}: Ray {info['version']}, {info['nodes']} node(s), {info['cpus']:g} CPU; "
        f"actors: {actors.detail}",
        actors.fix,
    )


# ---- WeCom credentials -------------------------------------------------------------------

_B64 = re.compile(r"^[A-Za-z0-9+/]{43}$")
_TOKEN = re.compile(r"^[A-Za-z0-9]{1,32}$")


def _aes_key_problem(key: str) -> str | None:
    """What is wrong with an EncodingAESKey (43 base64 characters, 32 bytes), or None."""
    if not _B64.match(key):
        return f"encoding_aes_key must be 43 base64 characters (has {len(key)})"
    try:
        if len(base64.b64decode(key + "=")) != 32:
            return "encoding_aes_key does not decode to a 32-byte AES key"
    except binascii.Error:
        return "encoding_aes_key is not valid base64"
    return None


def _wecom_check(settings: Settings) -> Check:
    w = settings.wecom
    problems: list[str] = []
    key_problem = _aes_key_problem(w.encoding_aes_key.get_secret_value())
    if key_problem:
        problems.append(key_problem)
    if not w.corp_id.strip():
        problems.append("corp_id is empty")
    token = w.token.get_secret_value()
    if not _TOKEN.match(token):
        problems.append("token must be 1-32 letters or digits (as WeCom generates it)")
    if not w.kf_secret.get_secret_value():
        problems.append("kf_secret is empty")
    demo_fields = [  # judged by the same policy that load_settings enforces
        f.field.removeprefix("wecom.")
        for f in secret_findings(settings)
        if f.field.startswith("wecom.") and f.reason == "the built-in demo value"
    ]
    fix = (
        "set QYWX_WECOM__CORP_ID, QYWX_WECOM__TOKEN, QYWX_WECOM__ENCODING_AES_KEY, "
        "QYWX_WECOM__KF_SECRET"
    )
    if problems:
        return Check("wecom.credentials", False, "; ".join(problems), fix)
    if demo_fields and settings.profile == "production":
        return Check(
            "wecom.credentials",
            False,
            f"production profile uses the built-in demo values for {', '.join(demo_fields)}",
            fix,
        )
    detail = f"corp_id {w.corp_id}; token, 43-char EncodingAESKey and kf_secret present"
    if demo_fields:
        return Check(
            "wecom.credentials",
            True,
            detail + f" (demo values: {', '.join(demo_fields)}; fine for development)",
            warn=True,
        )
    if not w.corp_id.startswith("ww"):
        return Check(
            "wecom.credentials", True, detail + " (corp_id usually starts with 'ww')", warn=True
        )
    return Check("wecom.credentials", True, detail)


def _secrets_check(settings: Settings) -> Check:
    """The findings `load_settings` refuses in production (secret_policy.py), never values:
    FAIL in production (every other command would exit 2), WARN elsewhere."""
    findings = secret_findings(settings)
    fix = "set real values through the environment (QYWX_...), see SECURITY.md"
    if not findings:
        return Check("secrets", True, "no default, demo or placeholder secret")
    detail = "; ".join(str(f) for f in findings)
    if is_enforced(settings):
        return Check("secrets", False, f"production profile refuses: {detail}", fix)
    return Check("secrets", True, f"{detail} (fine for development only)", fix, warn=True)


# ---- entry points ------------------------------------------------------------------------


def _guard(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a doctor reports every failure, it never crashes on one
        return [Check(name, False, f"check crashed: {type(exc).__name__}: {exc}")]


def run_doctor(
    settings: Settings, *, ray_address: str | None = None, timeout_s: float = 10.0
) -> list[Check]:
    """Every check, in data-flow order; nothing is created, changed or sent."""
    return [
        *_guard("secrets", lambda: [_secrets_check(settings)]),
        *_guard("wecom.credentials", lambda: [_wecom_check(settings)]),
        *_guard("kafka", lambda: _kafka_checks(settings, timeout_s)),
        *_guard("redis", lambda: _redis_checks(settings.redis, timeout_s)),
        *_guard("ray", lambda: _ray_check(ray_address, timeout_s, settings.ray_namespace)),
    ]


def format_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"[{c.status:4}] {c.name:<{width}}  {c.detail}")
        if c.fix and (not c.ok or c.warn):
            lines.append(f"       {'':<{width}}  fix: {c.fix}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - failed}/{len(checks)} checks passed")
    return "\n".join(lines)


def main_doctor(settings: Settings, *, ray_address: str | None = None) -> int:
    """Print the report; exit code 0 when every check passed, else 1."""
    checks = run_doctor(settings, ray_address=ray_address)
    print(f"qywx-ray doctor (profile {settings.profile})")
    print(format_checks(checks))
    return 0 if all(c.ok for c in checks) else 1

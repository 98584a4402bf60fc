"""`make demo`: the whole pipeline on this machine, with a live view and a final audit.

Starts (or reuses) Kafka + Redis, a Ray head (`ray start --head`, so the dashboard is
there), the WeCom simulator with a population of chatting customers, the Serve ingress,
the consumers with the default handler (transcript in Redis + an echo reply through
kf/send_msg), and the DLQ recovery actor. Ctrl-C (or --duration-s) stops what it
started, by PID, and prints an audit against the simulator's ground truth that rests on
what the framework records (done-flags, the DLQ index), so it holds for any handler
(`QYWX_CONSUME__HANDLER`); only the order check needs the default handler's transcript.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qywx_ray.devstack.local import LocalStack
from qywx_ray.devstack.procs import kill_named_actors
from qywx_ray.devstack.simproc import SimulatorProcess
from qywx_ray.settings import Settings, _deep_merge, load_settings

HTTP_PORT = 8000
SIM_PORT = 8081
DASHBOARD_PORT = 8265
RAY_METRICS_PORT = 8080


def dashboard_login(env: dict[str, str] | None = None, home: Path | None = None) -> str:
    """How to log in to the dashboard and use Ray's CLI, for the banner.

    Ray 2.60 turns token auth on for `ray start --head` when a token exists in
    ~/.ray/auth_token (any earlier local `ray.init()` creates one) or RAY_AUTH_MODE=token;
    the dashboard then asks for that token and Ray's CLI fails with an authentication
    error until RAY_AUTH_MODE=token is set in its shell."""
    import os

    env = dict(os.environ) if env is None else env
    mode = env.get("RAY_AUTH_MODE", "").lower()
    token_file = (home or Path.home()) / ".ray" / "auth_token"
    if mode == "disabled" or (mode != "token" and not token_file.exists()):
        return "  Ray auth          off (RAY_AUTH_MODE=disabled or no ~/.ray/auth_token)\n"
    return (
        "  Ray login         token auth is on: paste the output of `ray get-auth-token`\n"
        f"                    (the file {token_file}) into the dashboard's login box\n"
        "  Ray CLI           RAY_AUTH_MODE=token ray list actors   (in any other shell)\n"
    )


@dataclass
class Started:
    stack: LocalStack | None = None
    ray_head: bool = False
    ray_temp_dir: str = ""
    sim: SimulatorProcess | None = None
    serve: bool = False
    pipeline: Any = None
    actors: list[tuple[str, str]] = field(default_factory=list)


RAY_GCS_PORT = 6380


def start_ray_head(
    temp_dir: str,
    port: int = RAY_GCS_PORT,
    dashboard_port: int = DASHBOARD_PORT,
    metrics_port: int = RAY_METRICS_PORT,
) -> bool:
    """`ray start --head` (Ray's files under `temp_dir`) unless a Ray already answers on
    `port`; True if we started it. The temp dir is what lets `stop_ray_head` stop
    this Ray and no other one on the machine."""
    from qywx_ray.devstack.procs import port_open

    if port_open(port):
        return False
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--num-cpus=4",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--metrics-export-port={metrics_port}",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return True


def stop_ray_head(temp_dir: str) -> int:
    """Stop the Ray `start_ray_head` started, by PID (the processes that run with its
    temp dir), never `ray stop`: that ends every Ray on the machine, other people's too.
    Returns how many processes were running."""
    from qywx_ray.devstack.raycluster import stop_ray_under

    stopped = stop_ray_under(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return stopped


class Progress:
    """Reads the pipeline's state from the outside (Kafka offsets, Redis, the simulator)."""

    def __init__(self, settings: Settings, sim: SimulatorProcess) -> None:
        from confluent_kafka import Consumer

        self.settings = settings
        self.sim = sim
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka.bootstrap_servers,
                "group.id": settings.kafka.consumer.group_id,
                "enable.auto.commit": False,
            }
        )
        self.started = time.monotonic()
        self.last: tuple[float, int] = (self.started, 0)

    def offsets(self, topic: str, partitions: int) -> tuple[int, int]:
        from confluent_kafka import TopicPartition

        tps = [TopicPartition(topic, p) for p in range(partitions)]
        end = sum(self.consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in tps)
        committed = sum(max(tp.offset, 0) for tp in self.consumer.committed(tps, timeout=5))
        return end, committed

    def line(self) -> str:
        main = self.settings.kafka.main_topic
        dlq = self.settings.kafka.dlq_topic
        end, committed = self.offsets(main.name, main.partitions)
        dlq_end, _ = self.offsets(dlq.name, dlq.partitions)
        stats = self.sim.stats()
        now = time.monotonic()
        rate = (committed - self.last[1]) / max(now - self.last[0], 1e-6)
        self.last = (now, committed)
        return (
            f"t={now - self.started:5.0f}s  wecom msgs={stats.get('messages', 0):>7,}  "
            f"kafka={end:>7,}  processed(committed)={committed:>7,}  lag={end - committed:>5,}  "
            f"replies={stats.get('sends', 0):>6,}  dlq={dlq_end:>4,}  {rate:6.0f} msg/s"
        )

    def close(self) -> None:
        self.consumer.close()


DEFAULT_HANDLER = "qywx_ray.consume.handlers:default_handler"


@dataclass
class DemoAudit:
    """What the framework's own records say about every message WeCom holds.

    `processed` rests on done-flags (written by the framework after a handler succeeded,
    whatever the handler is), `dead_lettered` on the DLQ index; `lost` is what has
    neither. Order and duplicated side effects can only be read from a record the handler
    keeps: the default handler's transcript. With another handler they are `None` (not
    checked), never a guess. `state_mismatch` compares each customer's per-user state
    (`ctx.state`, kept by the default handler and the FAQ bot: `messages`, `last_msgid`)
    with WeCom's record: the count must equal the customer's processed messages (each
    applied exactly once) and the last applied id must be one of them; None when the
    handler keeps no such state.
    """

    messages: int = 0
    processed: int = 0
    dead_lettered: int = 0
    lost: int = 0
    reordered_users: int | None = None
    duplicated: int | None = None
    state_mismatch: int | None = None
    lost_ids: list[str] = field(default_factory=list)
    state_mismatch_users: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.reordered_users and not self.state_mismatch

    def line(self) -> str:
        def shown(value: int | None) -> str:
            return "n/a" if value is None else str(value)

        return (
            f"messages={self.messages} processed={self.processed} "
            f"dead_lettered={self.dead_lettered} (retried later or in review) "
            f"lost={self.lost} reordered={shown(self.reordered_users)} "
            f"duplicated_side_effects={shown(self.duplicated)}"
            + ("" if self.duplicated is not None else " (order: the default handler only)")
            + f" state_mismatch={shown(self.state_mismatch)}"
        )


def audit_records(
    truth: dict[str, dict[str, list[str]]],
    done: set[str],
    dead: set[str],
    transcripts: dict[tuple[str, str], list[str]] | None = None,
    states: dict[str, dict[str, Any]] | None = None,
) -> DemoAudit:
    """Pure: WeCom's record (`truth`: kfid -> user -> msgids in order) against the
    framework's done-flags and dead letters, and, when given, each user's transcript and
    each user's state (external_userid -> decoded `ctx.state`, {} when it has none)."""
    result = DemoAudit()
    reordered = duplicated = 0
    for kfid, users in truth.items():
        for user, ids in users.items():
            result.messages += len(ids)
            for mid in ids:
                if mid in done:
                    result.processed += 1
                elif mid in dead:
                    result.dead_lettered += 1
                else:
                    result.lost += 1
                    result.lost_ids.append(mid)
            if transcripts is None:
                continue
            dups, in_order = _transcript_check(ids, transcripts.get((kfid, user), []))
            duplicated += dups
            reordered += 0 if in_order else 1
    if transcripts is not None:
        result.reordered_users, result.duplicated = reordered, duplicated
    if states is not None:
        result.state_mismatch_users = _state_mismatches(truth, done, states)
        result.state_mismatch = len(result.state_mismatch_users)
    return result


def _transcript_check(ids: list[str], got: list[str]) -> tuple[int, bool]:
    """(duplicated entries, in order?) of one user's transcript against WeCom's order.
    The transcript is capped (consume.transcript_max_len): the order of what it holds is
    checked, not its completeness (done-flags answer that)."""
    wanted = set(ids)
    kept = list(dict.fromkeys(m for m in got if m in wanted))
    present = set(kept)
    return len(got) - len(set(got)), kept == [m for m in ids if m in present]


def _state_mismatches(
    truth: dict[str, dict[str, list[str]]], done: set[str], states: dict[str, dict[str, Any]]
) -> list[str]:
    """Users whose state does not count each of their processed messages once (and end
    on one of them)."""
    processed: dict[str, list[str]] = {}
    for users in truth.values():
        for user, ids in users.items():
            processed.setdefault(user, []).extend(m for m in ids if m in done)
    mismatched = []
    for user, ids in sorted(processed.items()):
        state = states.get(user, {})
        count_ok = int(state.get("messages", 0)) == len(ids)
        last_ok = state.get("last_msgid") in ids if ids else "last_msgid" not in state
        if not (count_ok and last_ok):
            mismatched.append(user)
    return mismatched


def audit(settings: Settings, sim: SimulatorProcess) -> DemoAudit:
    """Every message in WeCom's record must be done (done-flag) or dead-lettered."""
    import redis as redis_lib

    from qywx_ray.consume.dedup import DONE_KEY
    from qywx_ray.consume.handlers import TRANSCRIPT_KEY, load_handler
    from qywx_ray.consume.state import LOAD_LUA, STATE_KEY, parse_loaded, state_spec
    from qywx_ray.store.client import make_redis

    client: redis_lib.Redis = make_redis(settings.redis)
    truth = sim.truth()
    ids = [mid for users in truth.values() for msgids in users.values() for mid in msgids]
    pipe = client.pipeline(transaction=False)
    for mid in ids:
        pipe.exists(DONE_KEY.format(mid))
    done = {mid for mid, flag in zip(ids, pipe.execute(), strict=True) if flag}
    # Dead-lettered messages are accounted for (retried later or reviewed), not lost.
    dead = {
        k.decode() if isinstance(k, bytes) else str(k) for k in client.hkeys("qywx:dlq:letters")
    }
    states = None
    handler = load_handler(settings.consume.handler)
    if state_spec(handler) is not None and getattr(handler, "__qywx_audit_state__", False):
        # (set by consume.state.counts_messages)
        users = sorted({u for by_user in truth.values() for u in by_user})
        got = client.eval(LOAD_LUA, len(users), *[STATE_KEY.format(u) for u in users])
        states = {
            user: (json.loads(slot.raw) if slot.raw else {})
            for user, slot in parse_loaded(users, got).items()
        }
    transcripts = None
    if settings.consume.handler == DEFAULT_HANDLER:
        transcripts = {
            (kfid, user): [
                json.loads(x)["msgid"]
                for x in client.lrange(TRANSCRIPT_KEY.format(kfid, user), 0, -1)
            ]
            for kfid, users in truth.items()
            for user in users
        }
    return audit_records(truth, done, dead, transcripts, states)


def run_demo(base: Settings, args: argparse.Namespace) -> int:  # noqa: C901 - the demo as one script: start, run, audit, stop; every start has its stop in `finally`
    import ray
    from ray import serve

    from qywx_ray.consume.pipeline import start_consumers, stop_consumers
    from qywx_ray.dlq.actor import start_recovery_actor
    from qywx_ray.ingress.app import deployment
    from qywx_ray.kafka.topics import ensure_topics
    from qywx_ray.obs.logging import configure_logging

    configure_logging("WARNING", "text")
    data = Path(base.data_dir).resolve()
    done = Started()
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    try:
        print("demo: starting Kafka and Redis (qywx-ray dev up) ...", flush=True)
        done.stack = LocalStack(data / "dev", brokers=1)
        # The simulator starts empty each time, so the demo starts from empty state too
        # (a WeCom cursor from an earlier simulator would be meaningless to this one).
        started = done.stack.up(fresh=True)
        for line in started:
            print(f"demo:   started {line}")
        settings = load_settings(
            overrides=_deep_merge(
                base.model_dump(),
                {
                    "data_dir": str(data),
                    "kafka": {"bootstrap_servers": done.stack.bootstrap()},
                    "redis": {"url": done.stack.redis_url()},
                    "wecom": {"api_base": f"http://127.0.0.1:{SIM_PORT}/cgi-bin"},
                    "consume": {"reply_enabled": True},
                    "obs": {"log_level": "WARNING"},
                },
            )
        )
        if not started:
            from qywx_ray.store.client import make_redis

            make_redis(settings.redis).flushdb()
            print("demo:   reusing the running Kafka/Redis (Redis db flushed)")
        for report in ensure_topics(settings.kafka):
            print(f"demo:   topic {report.name}: {report.action}")
        print("demo: starting Ray (ray start --head) ...", flush=True)
        # Short (Unix socket paths live under it) and ours alone.
        done.ray_temp_dir = tempfile.mkdtemp(prefix="qywx-demo-ray-", dir="/tmp")
        done.ray_head = start_ray_head(done.ray_temp_dir)
        ray.init(
            address=f"127.0.0.1:{RAY_GCS_PORT}",
            namespace=settings.ray_namespace,
            log_to_driver=False,
            configure_logging=False,
        )
        print("demo: starting the WeCom simulator, Serve ingress and consumers ...", flush=True)
        done.sim = SimulatorProcess(
            data / "sim",
            f"http://127.0.0.1:{HTTP_PORT}/wecom/callback",
            port=SIM_PORT,
            extra_args=["--users", str(args.users), "--rate", f"{args.rate_per_min}/min"],
        )
        done.pipeline = start_consumers(settings)
        start_recovery_actor(settings)
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        serve.run(deployment(settings), name="qywx", route_prefix="/")
        done.serve = True
        done.sim.start()
        token = settings.admin.token.get_secret_value()
        print(
            "\ndemo: running. Where to look:\n"
            f"  Ray dashboard     http://127.0.0.1:{DASHBOARD_PORT}\n"
            f"{dashboard_login()}"
            f"  Admin API (docs)  http://127.0.0.1:{HTTP_PORT}/docs   "
            f"(Authorization: Bearer {token})\n"
            f"  e.g.              curl -H 'Authorization: Bearer {token}' "
            f"http://127.0.0.1:{HTTP_PORT}/admin/dlq/stats\n"
            f"  Metrics           http://127.0.0.1:{HTTP_PORT}/metrics  and Ray's exporter "
            f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics\n"
            f"  WeCom simulator   http://127.0.0.1:{SIM_PORT}/sim/stats   /sim/truth\n"
            "  Ctrl-C to stop.\n",
            flush=True,
        )
        progress = Progress(settings, done.sim)
        deadline = time.monotonic() + args.duration_s if args.duration_s else float("inf")
        try:
            while not stop["flag"] and time.monotonic() < deadline:
                time.sleep(1.0)
                print(progress.line(), flush=True)
        except KeyboardInterrupt:
            pass
        # Let the last messages through before the audit.
        httpx_stop(done.sim)
        settle = time.monotonic() + 30
        while time.monotonic() < settle:
            end, committed = progress.offsets(
                settings.kafka.main_topic.name, settings.kafka.main_topic.partitions
            )
            if end == committed:
                break
            time.sleep(0.5)
        print(progress.line(), flush=True)
        progress.close()
        result = audit(settings, done.sim)
        print(f"\ndemo: audit against WeCom's record: {result.line()}", flush=True)
        if result.lost_ids:
            print(f"demo:   lost (first 5): {result.lost_ids[:5]}", flush=True)
        return 0 if result.ok else 1
    finally:
        print("demo: stopping ...", flush=True)
        with contextlib.suppress(Exception):
            if done.pipeline is not None:
                stop_consumers(done.pipeline, timeout_s=20)
        with contextlib.suppress(Exception):
            if done.serve:
                serve.shutdown()
        if done.sim is not None:
            done.sim.stop()
        with contextlib.suppress(Exception):
            if ray.is_initialized() and not done.ray_head:
                kill_named_actors(base.ray_namespace)
        with contextlib.suppress(Exception):
            ray.shutdown()
        if done.ray_head:
            stop_ray_head(done.ray_temp_dir)
        elif done.ray_temp_dir:
            shutil.rmtree(done.ray_temp_dir, ignore_errors=True)
        if done.stack is not None:
            stopped = done.stack.down()
            print("demo: stopped " + ", ".join(stopped) if stopped else "demo: stopped")


def httpx_stop(sim: SimulatorProcess) -> None:
    """Ask the simulator's customers to stop chatting (best effort)."""
    import httpx

    with contextlib.suppress(Exception):
        httpx.post(f"{sim.base_url}/sim/population/pause", timeout=5)

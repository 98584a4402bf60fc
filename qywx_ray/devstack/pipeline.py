"""The whole pipeline on this machine, as one object: for the demo, drills and benchmarks.

`LocalPipeline` starts its own Kafka (1 or 3 brokers) and Redis on free loopback ports
(or uses given ones), the WeCom simulator, the consumers, the DLQ recovery actor and the
Serve ingress on the current Ray (the caller owns `ray.init`). It can inject the faults
the drills need (kill -9 a broker, Redis, a consumer, a user host, the recovery actor, a
Serve replica) and audits the result against the simulator's ground truth:
every message processed once, in per-user order, or accounted for in the DLQ.

Benchmarks use `timed_recording_handler` / `timed_noop_handler`: they stamp handler
start against the simulator's creation time (`sim_created_ms`, see the simulator's
`--stamp-created-ms`) and write the stamps to Redis in batches, never one round trip
per message; `read_stamps` reads them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qywx_ray.consume.handlers import envelope_handler
from qywx_ray.devstack.kafka import KafkaCluster
from qywx_ray.devstack.procs import free_port, kill_named_actors, wait_until
from qywx_ray.devstack.redis import RedisServer
from qywx_ray.devstack.simproc import SimulatorProcess
from qywx_ray.settings import Settings, _deep_merge, load_settings

RECORD_KEY = "qywx:drill:record"
# Benchmarks: "user|message_id|sim_created_ms|handler_start_ms" per handler call.
STAMP_KEY = f"{RECORD_KEY}:stamps"
STAMP_FLUSH_S = 0.2
STAMP_FLUSH_MAX = 2000


class _StampBuffer:
    """Per worker process: handler-start stamps, flushed to Redis in batches (RPUSH)."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self.redis: Any = None

    def add(self, ctx: Any, start_ms: int) -> None:
        created = ctx.envelope.raw.get("sim_created_ms")
        created_ms = int(created) if isinstance(created, int | float) else -1
        self.entries.append(f"{ctx.user_id}|{ctx.message_id}|{created_ms}|{start_ms}")
        self.redis = ctx.redis
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._flusher())

    async def flush(self) -> None:
        while self.entries and self.redis is not None:
            chunk, self.entries = self.entries[:STAMP_FLUSH_MAX], self.entries[STAMP_FLUSH_MAX:]
            try:
                await self.redis.rpush(STAMP_KEY, *chunk)
            except Exception:  # noqa: BLE001 - Redis down: keep them (in order) for the next round
                self.entries[:0] = chunk
                return

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(STAMP_FLUSH_S)
            await self.flush()


_STAMPS = _StampBuffer()


async def timed_recording_handler(message: Any, ctx: Any) -> None:
    """The recording handler (audited side effects), plus a batched latency stamp."""
    from qywx_ray.testing.handlers import recording_handler

    _STAMPS.add(ctx, int(time.time() * 1000))
    result = recording_handler(message, ctx)
    if result is not None:
        await result


@envelope_handler
async def timed_noop_handler(message: Any, ctx: Any) -> None:
    """A trivial handler that only stamps (batched): for stress runs, where the recording
    handler's Redis call per message would be the thing measured. Like the consume
    bench's trivial handler it reads only the Envelope, so the host skips the typed WeCom
    parse (a pydantic model per message, ~9 % of a host's CPU in the stress profile)."""
    _STAMPS.add(ctx, int(time.time() * 1000))


@dataclass(frozen=True)
class Stamp:
    user: str
    message_id: str
    created_ms: int  # -1 when the message carried no sim_created_ms
    start_ms: int


def parse_stamps(raw: list[bytes] | list[str]) -> list[Stamp]:
    out = []
    for item in raw:
        text = item.decode() if isinstance(item, bytes) else item
        user, mid, created, start = text.rsplit("|", 3)
        out.append(Stamp(user, mid, int(created), int(start)))
    return out


def read_stamps(client: Any, start: int = 0) -> list[Stamp]:
    """Stamps written so far (from list index `start`), in write order."""
    return parse_stamps(client.lrange(STAMP_KEY, start, -1))


@dataclass
class AuditResult:
    messages: int
    processed: int
    dead_lettered: int
    lost: int
    reordered_users: int
    duplicated_side_effects: int
    handler_reruns: int = 0  # informational: at-least-once re-runs, absorbed by idempotency
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.reordered_users == 0 and self.duplicated_side_effects == 0

    def line(self) -> str:
        return (
            f"messages={self.messages} processed={self.processed} "
            f"dead_lettered={self.dead_lettered} lost={self.lost} "
            f"reordered={self.reordered_users} "
            f"duplicated_side_effects={self.duplicated_side_effects} "
            f"handler_reruns={self.handler_reruns}"
        )


@dataclass
class LocalPipeline:
    workdir: Path
    brokers: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    sim_args: list[str] = field(default_factory=lambda: ["--users", "0"])
    bootstrap: str | None = None
    redis_url: str | None = None
    # "always" for drills that kill Redis: with "everysec" a crash may lose up to ~2 s of
    # acknowledged writes (Redis's documented window), which no client can make up for.
    redis_appendfsync: str = "everysec"
    http_port: int = 0
    kafka: KafkaCluster | None = None
    redis: RedisServer | None = None
    sim: SimulatorProcess | None = None
    settings: Settings | None = None
    consume: Any = None
    serve_app: str = ""

    def start(self) -> LocalPipeline:
        from ray import serve

        from qywx_ray.consume.pipeline import start_consumers
        from qywx_ray.dlq.actor import start_recovery_actor
        from qywx_ray.ingress.app import deployment
        from qywx_ray.kafka.topics import ensure_topics

        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.bootstrap is None:
            self.kafka = KafkaCluster(
                self.workdir / "kafka",
                brokers=self.brokers,
                ports=[free_port() for _ in range(self.brokers)],
                heap_mb=384,
            ).start()
            self.bootstrap = self.kafka.bootstrap_servers
        if self.redis_url is None:
            self.redis = RedisServer(
                self.workdir / "redis", appendfsync=self.redis_appendfsync
            ).start()
            self.redis_url = self.redis.url
        self.http_port = self.http_port or free_port()
        self.sim = SimulatorProcess(
            self.workdir / "sim",
            f"http://127.0.0.1:{self.http_port}/wecom/callback",
            extra_args=self.sim_args,
        )
        tag = f"p{os.getpid()}x{int(time.time() * 1000) % 10**8}"
        base: dict[str, Any] = {
            "profile": "production" if self.brokers == 3 else "development",
            "data_dir": str(self.workdir / "data"),
            "kafka": {
                "bootstrap_servers": self.bootstrap,
                "consumer": {"group_id": f"g-{tag}"},
            },
            "redis": {"mode": "single", "url": self.redis_url},
            "wecom": {"api_base": self.sim.api_base},
            "consume": {
                "namespace": f"ns-{tag}",
                "handler": "qywx_ray.testing.handlers:recording_handler",
                "record_key": RECORD_KEY,
            },
            "ingest": {"sweep_interval_s": 2.0, "backoff_initial_s": 0.2, "backoff_max_s": 2.0},
        }
        profile = "production" if self.brokers == 3 else "development"
        # The 3-broker drills run the production topic layout on the demo credentials.
        self.settings = load_settings(
            profile=profile,
            overrides=_deep_merge(base, self.overrides),
            allow_default_secrets=True,
        )
        ensure_topics(self.settings.kafka)
        self.consume = start_consumers(self.settings)
        start_recovery_actor(self.settings)
        # One proxy, on the head: with a proxy per node (Serve's default) every node of a
        # local multi-node cluster would bind the same loopback port.
        serve.start(
            proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.http_port}
        )
        self.serve_app = f"qywx-{tag}"
        serve.run(deployment(self.settings), name=self.serve_app, route_prefix="/")
        self.sim.start()
        return self

    # ------------------------------------------------------------------ faults
    def kill_broker(self, node_id: int = 1) -> None:
        assert self.kafka is not None
        self.kafka.kill9(node_id)

    def restart_broker(self, node_id: int = 1, timeout_s: float = 180.0) -> None:
        assert self.kafka is not None
        self.kafka.start_node(node_id, timeout_s=timeout_s)

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill9()

    def restart_redis(self) -> None:
        assert self.redis is not None
        self.redis.start()

    def _kill_actor_process(self, handle: Any) -> int:
        import ray

        pid = int(ray.get(handle.pid.remote(), timeout=30))
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_consumer(self, index: int = 0) -> int:
        return self._kill_actor_process(self.consume.consumers[index])

    def kill_host(self, index: int = 0) -> int:
        return self._kill_actor_process(self.consume.hosts[index])

    # ------------------------------------------------------------------ state
    def actor_nodes(self, timeout_s: float = 10.0) -> dict[str, str | None]:
        """Each named actor of this pipeline (consumers, user hosts, syncer hosts, DLQ
        recovery) -> the node id it answers from (None: it did not answer in time)."""
        from qywx_ray.placement import actor_nodes

        assert self.settings is not None
        rows = actor_nodes(self.settings.ray_namespace, timeout_s=timeout_s)
        return {r["name"]: r["node_id"] for r in rows}

    def redis_client(self) -> Any:
        from qywx_ray.store.client import make_redis

        assert self.settings is not None
        return make_redis(self.settings.redis)

    def lag(self) -> int:
        """Messages on the main topic not yet committed by the consumer group."""
        from confluent_kafka import Consumer, TopicPartition

        assert self.settings is not None
        k = self.settings.kafka
        c = Consumer(
            {
                "bootstrap.servers": k.bootstrap_servers,
                "group.id": k.consumer.group_id,
                "enable.auto.commit": False,
            }
        )
        try:
            tps = [TopicPartition(k.main_topic.name, p) for p in range(k.main_topic.partitions)]
            end = sum(c.get_watermark_offsets(tp, timeout=5)[1] for tp in tps)
            done = sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=5))
            return end - done
        finally:
            c.close()

    def wait_drained(
        self, expected: int, timeout_s: float = 120.0, processed: int | None = None
    ) -> None:
        """Until `expected` distinct messages are processed or dead-lettered (and at least
        `processed` processed), and the consumer group has committed everything."""
        client = self.redis_client()

        def done() -> bool:
            try:
                effects = {x.decode().partition("|")[2] for x in client.lrange(RECORD_KEY, 0, -1)}
                if processed is not None and len(effects) < processed:
                    return False
                return len(effects | self.dead_letter_ids(client)) >= expected and self.lag() == 0
            except Exception:  # noqa: BLE001 - a poll: any failure means not yet (bounded by wait_until)
                return False

        wait_until(done, timeout_s=timeout_s, what=f"{expected} messages handled", interval_s=0.5)

    def dead_letter_ids(self, client: Any) -> set[str]:
        """Message ids the DLQ recovery side has indexed (scheduled, retried, manual review)."""
        return {k.decode() for k in client.hkeys("qywx:dlq:letters")}

    def dead_letter_count(self, client: Any) -> int:
        return len(self.dead_letter_ids(client))

    def audit(self) -> AuditResult:
        assert self.sim is not None
        client = self.redis_client()
        truth = self.sim.truth()
        effects = [x.decode() for x in client.lrange(RECORD_KEY, 0, -1)]
        calls = [x.decode() for x in client.lrange(f"{RECORD_KEY}:calls", 0, -1)]
        after_done = {
            x.decode().partition("|")[2] for x in client.lrange(f"{RECORD_KEY}:after_done", 0, -1)
        }
        dead = self.dead_letter_ids(client)
        per_user: dict[str, list[str]] = {}
        for entry in effects:
            user, _, mid = entry.partition("|")
            per_user.setdefault(user, []).append(mid)
        call_counts: dict[str, int] = {}
        for entry in calls:
            mid = entry.partition("|")[2]
            call_counts[mid] = call_counts.get(mid, 0) + 1
        result = AuditResult(0, len(effects), 0, 0, 0, 0)
        for users in truth.values():
            for user, ids in users.items():
                result.messages += len(ids)
                got = per_user.get(user, [])
                missing = [m for m in ids if m not in set(got) and m not in dead]
                result.dead_lettered += sum(1 for m in ids if m in dead and m not in set(got))
                result.lost += len(missing)
                if missing:
                    result.details.append(f"user {user}: lost {missing[:3]}...")
                # A dead-lettered message may come back later by design (e.g. rate-limited
                # ones are exempt from parking); order is checked on everything else.
                straight = [m for m in got if m not in dead]
                expected_order = [m for m in ids if m in set(straight)]
                if straight != expected_order:
                    result.reordered_users += 1
                    result.details.append(
                        f"user {user}: order {straight[:5]} vs {expected_order[:5]}"
                    )
                # A duplicate is a handler run that started after the message's done-flag
                # was durable (dedup failed). A re-run whose predecessor's outcome the
                # pipeline never saw (crash before the flag, reply lost with Redis) is
                # at-least-once delivery, absorbed by the idempotent effect: counted apart.
                dups = [m for m in set(got) if m in after_done]
                result.duplicated_side_effects += len(dups)
                if dups:
                    result.details.append(f"user {user}: ran again after done {dups[:3]}")
                result.handler_reruns += sum(
                    1 for m in set(got) if call_counts.get(m, 0) > 1 and m not in after_done
                )
        return result

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        from ray import serve

        from qywx_ray.consume.pipeline import stop_consumers

        if self.consume is not None:
            with contextlib.suppress(Exception):
                stop_consumers(self.consume, timeout_s=15)
        if self.serve_app:
            # The proxy keeps the port it started with: the next pipeline needs a fresh one.
            with contextlib.suppress(Exception):
                serve.shutdown()
        if self.settings is not None:
            with contextlib.suppress(Exception):  # the namespace is this pipeline's alone
                kill_named_actors(self.settings.ray_namespace, prefixes=("",))
        if self.sim is not None:
            self.sim.stop()
        if self.kafka is not None:
            self.kafka.stop()
        if self.redis is not None:
            self.redis.stop()

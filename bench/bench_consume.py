"""Consume benchmark: Kafka -> partition consumers -> user mailboxes -> handler, one run.

Real Kafka, Redis and Ray; 4 partitions; protections on (rate limiter consulted for every
message with a limit high enough that no bench message is denied, per-user breaker, dedup
done-flags). Per run it prints JSON lines (bench.output.emit) for:

  ceiling    raw confluent-kafka consume rate of the hosted trivial backlog (same topic)
  hosted     10,000 users in the default host actors (consume.num_hosts, one consumer by
             default): cold start (a new user's first message) p50/p99, Kafka-append ->
             handler-start p50/p99 at a steady 2,000 msg/s, then trivial-handler and 5 ms-
             I/O-handler drain throughput and CPU µs per message of the consumer and host
             actors during the drains (latency phases first: a drain leaves background
             work behind, e.g. Redis rewriting its AOF)
  concurrency  (`--peer-concurrency`, default 64) the hosted trivial and 5 ms drains again
             on a fresh pipeline with that many handlers in all (num_hosts x total /
             num_hosts): the peer bench's other concurrency (cases hosted_<handler>_c64)
  dedicated  50 users (quick: 20), each a real Ray actor: the same, at a lower paced rate
  dedicated_pool  (`--dedicated-pool N`, default the dedicated users) cold start again, the
             same number of new users at the same rate, on a pipeline with
             `consume.dedicated_pool_size` N: the pool is filled first (its fill time and
             starts/s recorded, case dedicated_pool_fill), then every new user claims a
             started spare (case dedicated_cold_start_pooled)
  state      (`--state-bytes N`, N > 0) per-user state off vs on in the same run: two fresh
             hosted pipelines drain the same trivial backlog, one with the trivial handler,
             one with a `@stateful` handler whose N-byte state changes on every message
             (load on activation + a version-checked write with each done-flag); the order
             of the two alternates per run. Cases hosted_state_off / hosted_state_on.

Latency = handler start (wall clock, in the host) minus the Kafka record timestamp (set
by the producer at produce(), so it includes the producer's linger). Every line carries
the 1-minute load average (`load1`); the machine is shared, quote medians of runs.
Full mode starts with one unrecorded hosted run (`--no-warmup` to skip): a fresh broker
JVM spends its first minutes JIT-compiling (30-60 % of a core here). Every hosted run
comes before the dedicated ones (dedicated mode churns dozens of Ray worker processes).
Between phases the consumers are stopped (drained, committed) and restarted while host
and user actors stay up, so a drain is measured on a backlog, from the first record
consumed to the last completion reported back (done-flag durable).

    QYWX_BENCH_QUICK=1 QYWX_BENCH_BOOTSTRAP=127.0.0.1:19092 \\
      QYWX_BENCH_REDIS_URL=redis://127.0.0.1:16390/6 python -m bench.bench_consume
"""

# bench-timeout-s: full=1500 quick=600

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import ray

from bench import broker_gc, machine, output, procs
from bench.output import emit, log
from bench.runs import default_runs, quick_mode
from bench.services import _delete_topics, bench_services, produce_paced, settings_for
from bench.stats import percentiles
from qywx_ray.consume.pipeline import (
    ConsumePipeline,
    start_consumers,
    stop_consumers,
    user_actor_names,
)
from qywx_ray.envelope import Envelope
from qywx_ray.kafka.config import consumer_config, producer_config
from qywx_ray.testing.consume import ensure_topics, produce, wait_for

BENCH = "consume"
HANDLER = "qywx_ray.consume.handlers:bench_handler"
# Consulted for every message (one EVALSHA per batch), never denies a bench message.
NO_DENIAL_RULE = {
    "window_seconds": 10,
    "max_messages": 1_000_000,
    "penalty_threshold": 1_000_000,
    "block_hours": 1.0,
}


REDIS_LATENCY_MS = 10  # Redis stalls recorded beside a latency window
SLOW_MS = 50  # the steady target: a sample above it counts as slow in `slow_profile`


def slow_profile(stats: dict[str, Any], samples: list[int]) -> dict[str, Any]:
    """Where one target's slow samples fell in a window: its p99, and the Kafka ->
    host-arrival p99 (high too: the delay was before the host; low: inside it), and how
    many samples above SLOW_MS each tenth of the window held (samples are in handler-start
    order, so tenths are time slices; the same tenth slow on every host = a common
    cause). Evidence for an outlier, not a result."""
    n = len(samples)
    tenths = [0] * 10
    for i, x in enumerate(samples):
        if x > SLOW_MS:
            tenths[i * 10 // n] += 1
    return {
        "n": n,
        "p99_ms": stats.get("p99_ms"),
        "arrival_p99_ms": stats.get("arrival_p99_ms"),
        "max_ms": stats.get("max_ms"),
        "slow_by_tenth": tenths,
    }


def make_envelopes(
    users_tag: str,
    ids_tag: str,
    users: int,
    per_user: int,
    first_user: int = 0,
    bursts: bool = False,
    **raw: Any,
) -> list[Envelope]:
    """Round-robin over users (every user's n-th message before anyone's n+1-th), or with
    `bursts` each user's messages back to back; user ids from `users_tag` (phases share
    users), message ids unique per `ids_tag`."""
    out = []
    order = (
        [(n, u) for u in range(first_user, first_user + users) for n in range(per_user)]
        if bursts
        else [(n, u) for n in range(per_user) for u in range(first_user, first_user + users)]
    )
    for n, u in order:
        user = f"{users_tag}u{u}"
        out.append(
            Envelope(
                message_id=f"{ids_tag}-{u}-{n:06d}",
                open_kfid="kf-bench",
                external_userid=user,
                msgtype="text",
                raw={"text": {"content": f"hello {n}"}, **raw},
            )
        )
    return out


class ModeBench:
    """One pipeline (hosted or dedicated) and its phases; host/user actors stay up."""

    def __init__(
        self,
        args: argparse.Namespace,
        svc: Any,
        mode: str,
        run: int,
        handler: str = HANDLER,
        consume: dict[str, Any] | None = None,
    ) -> None:
        self.args = args
        self.mode = mode
        self.run = run
        self.tag = f"{mode[0]}{run}{uuid.uuid4().hex[:5]}"
        self.users = args.users if mode == "hosted" else args.dedicated_users
        self.owns_redis = svc.owns_redis  # its latency monitor and slow log are ours to reset
        self.window_targets: list[dict[str, Any]] = []  # window_samples -> emit_latency
        self.settings = settings_for(
            svc.bootstrap_servers,
            svc.redis_url,
            svc.workdir,
            overrides={
                "kafka": {
                    "main_topic": {"partitions": args.partitions},
                    "consumer": {"fetch_min_bytes": args.fetch_min_bytes},
                },
                "consume": {
                    "mode": mode,
                    "namespace": f"bench-{self.tag}",
                    "name_prefix": f"b{self.tag}",
                    "handler": handler,
                    **({"num_hosts": args.hosts} if args.hosts else {}),
                    **({"num_consumers": args.consumers} if args.consumers else {}),
                    "max_dedicated_actors": max(100, 2 * args.dedicated_users),
                    **(
                        {"poll_linger_ms": args.poll_linger_ms}
                        if args.poll_linger_ms is not None
                        else {}
                    ),
                    **(consume or {}),
                },
                "protect": {"enabled": True, "default": NO_DENIAL_RULE},
                "obs": {"log_level": "WARNING"},
            },
            tag=self.tag,
        )
        ensure_topics(self.settings)
        self.topics = [self.settings.kafka.main_topic.name, self.settings.kafka.dlq_topic.name]
        self.pipeline: ConsumePipeline | None = None
        self.done_before = 0
        self._redis: Any = None
        self.paced_started = 0.0  # Unix s of the last paced load's first record
        port = int(svc.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
        self.broker_pid = procs.pid_listening_on(port)
        self.broker_logs = svc.broker_logs  # the bench's own brokers' gc logs are there

    def dims(self, **more: Any) -> dict[str, Any]:
        out = {
            "bench": BENCH,
            "run": self.run,
            "stage": "consume",
            "partitions": self.args.partitions,
            "users": self.users,
            "pipeline": self.mode,
            **more,
        }
        if self.run < 0:  # the warm-up run: recorded, and marked so it is never a result
            out["warmup"] = True
        return out

    # ------------------------------------------------------------------ plumbing

    def start(self) -> ConsumePipeline:
        p = start_consumers(self.settings)
        self.pipeline = p
        if not p.wait_assigned(self.args.partitions, 90):
            raise RuntimeError("consumers did not get every partition within 90 s")
        return p

    def stop_consumers_only(self) -> None:
        assert self.pipeline is not None
        stop_consumers(self.pipeline, timeout_s=30, kill_hosts=False)
        c = self.settings.consume
        names = [f"{c.name_prefix}-consumer-{i}" for i in range(c.num_consumers)]

        def gone() -> bool:
            for name in names:
                try:
                    ray.get_actor(name, namespace=self.settings.consume.namespace)
                    return False
                except ValueError:
                    pass
            return True

        wait_for(gone, 30)
        self.pipeline = None

    def stop_all(self) -> None:
        if self.pipeline is not None:
            stop_consumers(self.pipeline, timeout_s=30, kill_hosts=True)
            self.pipeline = None
        else:  # hosts and user actors left up between phases
            p = ConsumePipeline(self.settings, self._hosts(), [])
            stop_consumers(p, timeout_s=5, kill_hosts=True)

    def _hosts(self) -> list[Any]:
        out = []
        for i in range(self.settings.consume.num_hosts):
            with contextlib.suppress(ValueError):
                out.append(
                    ray.get_actor(
                        f"{self.settings.consume.name_prefix}-user-host-{i}",
                        namespace=self.settings.consume.namespace,
                    )
                )
        return out

    def _targets(self) -> list[Any]:
        """Every actor that runs handlers: hosts plus (dedicated) user actors."""
        ns = self.settings.consume.namespace
        out = self._hosts()
        for name in user_actor_names(ns):
            with contextlib.suppress(ValueError):
                out.append(ray.get_actor(name, namespace=ns))
        return out

    def completed(self) -> tuple[int, int]:
        assert self.pipeline is not None
        snaps = self.pipeline.snapshots()
        return (
            sum(s["stats"]["completed"] for s in snaps),
            sum(s["stats"]["consumed"] for s in snaps),
        )

    def samples(self, reset: bool) -> list[int]:
        out: list[int] = []
        for got in ray.get([t.latency_samples.remote(reset) for t in self._targets()], timeout=60):
            out.extend(got)
        return out

    def window_samples(self) -> list[int]:
        """Every target's samples of the window (reset), and per target where its slow
        ones fell (`self.window_targets`, emitted with the window's latency lines)."""
        targets = self._targets()
        stats = ray.get([t.latency_stats.remote(False) for t in targets], timeout=60)
        per = ray.get([t.latency_samples.remote(True) for t in targets], timeout=60)
        self.window_targets = [slow_profile(st, xs) for st, xs in zip(stats, per, strict=True)]
        return [x for xs in per for x in xs]

    def pids(self) -> dict[str, list[int]]:
        assert self.pipeline is not None
        consumers = ray.get([c.pid.remote() for c in self.pipeline.consumers], timeout=30)
        actors = ray.get([t.pid.remote() for t in self._targets()], timeout=60)
        return {"consumers": list(consumers), "hosts": list(actors)}

    # ------------------------------------------------------------------ phases

    def drain(
        self,
        name: str,
        per_user: int,
        sleep_ms: float,
        ceiling: bool,
        raw: dict[str, Any] | None = None,
        case: str = "",
        bursts: bool = False,
        record: bool = True,
    ) -> None:
        """Produce a backlog with the consumers stopped, then time the drain. `record`
        False: a warm-up drain (the users' mailboxes made), nothing emitted."""
        extra: dict[str, Any] = {"sleep_ms": sleep_ms} if sleep_ms else {}
        extra.update(raw or {})
        msgs = make_envelopes(
            self.tag, f"{self.tag}{name}", self.users, per_user, bursts=bursts, **extra
        )
        n = produce(self.settings, msgs)
        if ceiling:
            self.raw_ceiling(n)
        quiet_wait_s = self.wait_redis_quiet()
        redis_start = self.redis_busy()
        # CPU baseline taken as soon as the consumers answer (they are still joining the
        # group); fresh consumer instances count completions from 0
        p = self.pipeline = start_consumers(self.settings)
        cpu0 = {pid: procs.cpu_seconds(pid) for v in self.pids().values() for pid in v}
        deadline = time.monotonic() + self.args.timeout_s
        done = 0
        while time.monotonic() < deadline:
            done = self.completed()[0]
            if done >= n:
                break
            time.sleep(0.05)
        if not record:  # a warm-up: nothing to time or count
            self.stop_consumers_only()
            if done < n:
                raise RuntimeError(f"warm-up drain: only {done}/{n} completed")
            return
        t_end = time.time()
        firsts = [s["first_consumed_unix_s"] for s in p.snapshots()]
        t_first = min((f for f in firsts if f is not None), default=t_end)
        pids_after = self.pids()  # a pid that appeared meanwhile counts from 0 CPU s
        used = {
            k: sum(procs.cpu_seconds(x) - cpu0.get(x, 0.0) for x in v)
            for k, v in pids_after.items()
        }
        elapsed = t_end - t_first
        case = case or f"{self.mode}_{name}"
        dims: dict[str, Any] = {"state_bytes": raw["state_bytes"]} if raw else {}
        if bursts:
            dims["order"] = "bursts"
        if self.mode == "hosted":  # handlers at once in all (the peer comparison's key)
            c = self.settings.consume
            dims["concurrency"] = c.num_hosts * c.handler_concurrency
        common = self.dims(handler=name, **dims)
        emit(
            case=case,
            metric="throughput",
            value=round(done / elapsed, 1) if elapsed > 0 else 0.0,
            unit="msg/s",
            **common,
            extra={
                "messages": n,
                "completed": done,
                "elapsed_s": round(elapsed, 3),
                "loadavg": os.getloadavg(),
                "redis_quiet_wait_s": quiet_wait_s,
                "redis_start": redis_start,
                "redis_end": self.redis_busy(),
            },
        )
        for group in ("consumers", "hosts"):
            emit(
                case=case,
                metric=f"cpu_per_msg_{group}",
                value=round(used[group] / max(1, n) * 1e6, 1),
                unit="us/msg",
                **common,
                extra={"pids": len(pids_after[group])},
            )
        self.stop_consumers_only()
        if done < n:
            emit(kind="error", case=case, run=self.run, error=f"only {done}/{n} completed")
        del p

    def paced(
        self,
        name: str,
        rate: float,
        msgs: list[Envelope],
        ready: Callable[[], object] | None = None,
    ) -> list[int]:
        """Produce at a steady rate with consumers running; handler-start latencies (ms).
        `ready` runs after the producer's warm-up records are handled, before the load."""
        from confluent_kafka import Producer

        s = self.settings
        if self.pipeline is None:
            self.start()
        # Warm the producer with a few records first: a new idempotent producer holds
        # its first ~0.5 s of records while it fetches metadata and a producer id.
        producer = Producer(producer_config(s.kafka))
        warm = make_envelopes(self.tag, f"{self.tag}{name}w", 4, 1, first_user=10**6)
        base = self.completed()[0]
        for env in warm:
            producer.produce(
                s.kafka.main_topic.name,
                key=env.key,
                value=env.to_bytes(),
                headers=list(env.headers()),  # type: ignore[arg-type]
            )
        producer.flush(30)
        wait_for(lambda: self.completed()[0] - base >= len(warm), 60)
        if ready is not None:
            ready()
        # Serialised before the paced load: its generator shares the 2 vCPUs with the
        # system under test, so per-record work is kept out of the paced loop.
        records = [(env.key, env.to_bytes(), list(env.headers())) for env in msgs]
        self.samples(reset=True)
        base = self.completed()[0]
        # background(): where the paced load began
        self.paced_started = produce_paced(producer, s.kafka.main_topic.name, records, rate)
        producer.flush(30)
        ok = wait_for(lambda: self.completed()[0] - base >= len(msgs), self.args.timeout_s)
        got = self.window_samples()
        if not ok:
            emit(kind="error", case=f"{self.mode}_{name}", run=self.run, error="not all completed")
        return got

    def emit_latency(
        self,
        name: str,
        rate: float,
        samples: list[int],
        background: dict[str, Any] | None = None,
        **more: Any,
    ) -> None:
        if not samples:
            emit(kind="error", case=f"{self.mode}_{name}", run=self.run, error="no samples")
            return
        pct = percentiles(samples, [50, 99, 100])
        extra = {"samples": len(samples), "max_ms": pct[100], "loadavg": os.getloadavg()}
        if self.window_targets:
            extra["targets"], self.window_targets = self.window_targets, []
        if background:
            extra["background"] = background
        for q, metric in ((50, "latency_p50"), (99, "latency_p99")):
            emit(
                case=f"{self.mode}_{name}",
                metric=metric,
                value=pct[q],
                unit="ms",
                rate_msg_per_s=rate,
                **self.dims(handler="trivial", **more),
                extra=extra,
            )

    @contextlib.contextmanager
    def background(self) -> Iterator[dict[str, Any]]:
        """What ran beside a latency window: the broker's CPU (its JIT shows up here),
        Redis background saves/rewrites at the start and end, CPU steal, the Python
        collector's pauses of >= 10 ms in hosts and consumers during it, Redis's own
        stalls (latency monitor, slow log), the broker JVM's collector pauses and every
        process's CPU in 0.5 s slices.
        Filled on exit; evidence for an outlier, not a result."""
        facts: dict[str, Any] = {}
        broker = self.broker_pid
        cpu0 = procs.cpu_seconds(broker) if broker else None
        jiffies0 = machine.cpu_jiffies()
        wall0 = time.time()
        t0 = time.monotonic()
        facts["redis_start"] = self.redis_busy()
        self.redis_latency_reset()
        sampler = procs.CpuSampler(0.5)
        try:
            with sampler:
                yield facts
        finally:
            elapsed = time.monotonic() - t0
            if broker and cpu0 is not None:
                with contextlib.suppress(OSError):
                    facts["broker_cpu_pct"] = round(
                        (procs.cpu_seconds(broker) - cpu0) / elapsed * 100, 1
                    )
            facts["redis_end"] = self.redis_busy()
            facts["steal_pct"] = machine.steal_pct(jiffies0, machine.cpu_jiffies())
            facts["window_s"] = round(elapsed, 2)
            if self.paced_started >= wall0:
                # Times in this window (broker_gc, cpu_slices, gc_long_pauses) count from
                # its start; a target's slow_by_tenth counts from the first paced record.
                facts["paced_start_s"] = round(self.paced_started - wall0, 2)
            with contextlib.suppress(Exception):  # evidence only: never fail the window
                facts["gc_long_pauses"] = self.gc_long_pauses(wall0, time.time())
            with contextlib.suppress(Exception):
                facts["redis_latency"] = self.redis_latency(wall0)
            with contextlib.suppress(Exception):
                facts["broker_gc"] = broker_gc.broker_pauses(self.broker_logs, wall0, time.time())
            with contextlib.suppress(Exception):
                facts["cpu_slices"] = sampler.slices()

    def gc_long_pauses(self, since: float, until: float) -> dict[str, list[list[Any]]]:
        """Collector pauses of >= 10 ms that ended in [since, until], per process role:
        [seconds into the window, generation, ms] (qywx_ray.process_tuning.GcPauses)."""
        snaps: dict[str, list[dict[str, Any]]] = {
            "hosts": list(ray.get([h.snapshot.remote() for h in self._hosts()], timeout=30))
        }
        if self.pipeline is not None:
            snaps["consumers"] = self.pipeline.snapshots()
        return {
            role: [
                [round(end - since, 2), gen, ms]
                for snap in got
                for end, gen, ms in snap.get("gc", {}).get("long", [])
                if since <= end <= until
            ]
            for role, got in snaps.items()
        }

    def wait_redis_quiet(self, timeout_s: float = 120.0) -> float:
        """Before a drain: let a Redis AOF rewrite / background save that an earlier drain
        started finish first (bounded), so it is not charged to this one (a state-on drain
        appends ~55 MB of AOF at 10,000 users x 5). Returns the seconds waited, recorded in
        the drain's extra with Redis's persistence state at its start and end."""
        t0 = time.monotonic()
        while any(self.redis_busy().values()) and time.monotonic() - t0 < timeout_s:
            time.sleep(0.2)
        return round(time.monotonic() - t0, 2)

    def redis_busy(self) -> dict[str, int]:
        """Redis persistence work in progress (1/0), from INFO persistence."""
        try:
            info = self.redis().info("persistence")
        except Exception:
            return {}
        keys = ("aof_rewrite_in_progress", "rdb_bgsave_in_progress")
        return {k: int(info.get(k, 0)) for k in keys}

    def redis_latency_reset(self) -> None:
        """Start a window's Redis latency record: the latency monitor on (events of >= 10
        ms: AOF write/fsync, fork, expire cycle, eviction, slow commands) and reset. Only
        on the bench's own Redis: a shared one's settings and logs are not ours."""
        if not self.owns_redis:
            return
        with contextlib.suppress(Exception):
            r = self.redis()
            r.config_set("latency-monitor-threshold", REDIS_LATENCY_MS)
            r.execute_command("LATENCY", "RESET")
            r.slowlog_reset()

    def redis_latency(self, since: float) -> dict[str, Any]:
        """Redis's own stalls in the window: each latency-monitor event's latest and
        worst ms (with the latest one's second into the window), and the slow log's
        commands of >= 10 ms (CONFIG slowlog-log-slower-than is left as it is)."""
        if not self.owns_redis:
            return {}
        r = self.redis()
        events = {
            (e[0].decode() if isinstance(e[0], bytes) else e[0]): {
                "at_s": round(int(e[1]) - since, 1),
                "latest_ms": int(e[2]),
                "max_ms": int(e[3]),
            }
            for e in r.execute_command("LATENCY", "LATEST")
        }
        slow = [
            {"at_s": round(e["start_time"] - since, 1), "ms": round(e["duration"] / 1000, 1)}
            for e in r.slowlog_get(32)
            if e["duration"] >= REDIS_LATENCY_MS * 1000 and e["start_time"] >= int(since)
        ]
        return {"events": events, "slow_commands": slow}

    def redis(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.settings.redis.url)
        return self._redis

    def raw_ceiling(self, n: int) -> None:
        from confluent_kafka import Consumer

        conf = consumer_config(self.settings.kafka, group_id=f"raw-{self.tag}")
        c = Consumer(conf)
        c.subscribe([self.settings.kafka.main_topic.name])
        got = 0
        t_first: float | None = None
        deadline = time.monotonic() + self.args.timeout_s
        try:
            while got < n and time.monotonic() < deadline:
                batch = c.consume(1000, 0.5)
                if batch and t_first is None:
                    t_first = time.monotonic()
                got += sum(1 for m in batch if m.error() is None)
            elapsed = time.monotonic() - (t_first or time.monotonic())
        finally:
            c.close()
        emit(
            case="raw_consume",
            metric="throughput",
            value=round(got / elapsed, 1) if elapsed > 0 else 0.0,
            unit="msg/s",
            **self.dims(),
            extra={"messages": got, "elapsed_s": round(elapsed, 3), "loadavg": os.getloadavg()},
        )


def run_hosted(args: argparse.Namespace, svc: Any, run: int) -> list[str]:
    b = ModeBench(args, svc, "hosted", run)
    try:
        b.start()
        # cold start: paced first messages of users no host has seen
        cold = make_envelopes(b.tag, f"{b.tag}c", args.cold_users, 1, first_user=10**5)
        b.emit_latency("cold_start", args.cold_rate, b.paced("cold", args.cold_rate, cold))
        # steady before the drains: a 100,000-message drain leaves background work behind
        # (Redis rewrites its AOF after the done-flags doubled it, the broker flushes)
        # that would land on whatever phase runs next
        if args.steady_warmup_s > 0:
            # A production broker at 2,000 msg/s has run at that rate for hours: its JIT
            # has compiled the produce/fetch paths and the background work a burst left
            # (log flush, Redis AOF rewrite after the previous run's drains) is done.
            # The same paced load first, its latencies recorded as warm-up, never as
            # the result.
            n = max(1, round(args.rate * args.steady_warmup_s / b.users))
            warm = make_envelopes(b.tag, f"{b.tag}pw", b.users, n)
            with b.background() as bg:
                samples = b.paced("steady_warmup", args.rate, warm)
            b.emit_latency("steady_warmup", args.rate, samples, warmup=True, background=bg)
        per_user = max(1, round(args.rate * args.paced_s / b.users))
        steady = make_envelopes(b.tag, f"{b.tag}p", b.users, per_user)
        with b.background() as bg:
            samples = b.paced("steady", args.rate, steady)
        b.emit_latency("steady", args.rate, samples, background=bg)
        b.stop_consumers_only()
        b.drain("trivial", args.per_user, 0, ceiling=True)
        b.drain("sleep_5ms", args.per_user, 5, ceiling=False)
    finally:
        b.stop_all()
    return b.topics


STATE_HANDLER = "qywx_ray.consume.handlers:bench_state_handler"


def run_concurrency(args: argparse.Namespace, svc: Any, run: int) -> list[str]:
    """The hosted drains again at each total handler concurrency of the peer bench that
    the defaults do not run (`--peer-concurrency`, default 64: `consume.num_hosts` hosts ×
    64 / num_hosts handlers), on a fresh pipeline whose users' mailboxes a one-message
    drain made first (as the hosted run's latency phases made them there). Cases
    `hosted_<handler>_c<total>`: what `bench/render.py` sets beside Parallel Consumer at
    that concurrency."""
    topics: list[str] = []
    hosts = args.hosts or svc.settings.consume.num_hosts
    for total in args.peer_concurrency:
        b = ModeBench(args, svc, "hosted", run, consume={"handler_concurrency": total // hosts})
        topics += b.topics  # deleted at the end even if a drain below fails
        try:
            b.drain("warm", 1, 0, False, record=False)
            for name, sleep_ms in (("trivial", 0), ("sleep_5ms", 5)):
                b.drain(name, args.per_user, sleep_ms, False, case=f"hosted_{name}_c{total}")
        finally:
            b.stop_all()
    return topics


def run_state(args: argparse.Namespace, svc: Any, run: int) -> list[str]:
    """State off vs on, same run, same backlog shape; the order alternates per run so
    neither always meets the warmer machine."""
    topics: list[str] = []
    variants = [("off", HANDLER, None), ("on", STATE_HANDLER, {"state_bytes": args.state_bytes})]
    if run % 2:
        variants.reverse()
    for name, handler, raw in variants:
        b = ModeBench(args, svc, "hosted", run, handler=handler)
        topics += b.topics  # deleted at the end even if the drain below fails
        try:
            case = f"hosted_state_{name}"
            b.drain("trivial", args.per_user, 0, False, raw=raw, case=case, bursts=args.bursts)
        finally:
            b.stop_all()
    return topics


def run_dedicated(args: argparse.Namespace, svc: Any, run: int) -> list[str]:
    b = ModeBench(args, svc, "dedicated", run)
    try:
        b.start()
        # cold start: a new user's first message = a new Ray actor
        cold = make_envelopes(b.tag, f"{b.tag}c", b.users, 1)
        rate = args.dedicated_cold_rate
        b.emit_latency("cold_start", rate, b.paced("cold", rate, cold))
        b.stop_consumers_only()
        b.drain("trivial", args.dedicated_per_user, 0, ceiling=False)
        b.drain("sleep_5ms", args.dedicated_per_user, 5, ceiling=False)
        per_user = max(1, round(args.dedicated_rate * args.paced_s / b.users))
        steady = make_envelopes(b.tag, f"{b.tag}p", b.users, per_user)
        b.emit_latency(
            "steady", args.dedicated_rate, b.paced("steady", args.dedicated_rate, steady)
        )
    finally:
        b.stop_all()
    return b.topics


def run_dedicated_pool(args: argparse.Namespace, svc: Any, run: int) -> list[str]:
    """`cold_start` again with the warm pool: the pool is filled (timed), then the same
    number of new users at the same rate each claim a started spare."""
    size = args.dedicated_users if args.dedicated_pool is None else args.dedicated_pool
    if size <= 0:
        return []
    pool = {"dedicated_pool_size": size}
    if args.dedicated_pool_at_once is not None:
        pool["dedicated_pool_starts_at_once"] = args.dedicated_pool_at_once
    b = ModeBench(args, svc, "dedicated", run, consume=pool)
    try:
        p = b.start()
        if not p.wait_pool_full(900):
            raise RuntimeError(f"the pool did not reach {size} spares in 900 s")
        # From the keeper's start (consumer 0's, which starts spares while the consumers
        # join the group) to its first full pool.
        fill_s = float(p.snapshots()[0]["pool"]["filled_after_s"])
        emit(
            case="dedicated_pool_fill", metric="pool_fill_s", value=round(fill_s, 2), unit="s",
            starts_per_s=round(size / fill_s, 3), pool=size, loadavg=os.getloadavg(),
            at_once=p.settings.consume.dedicated_pool_starts_at_once,
            **b.dims(),
        )  # fmt: skip
        cold = make_envelopes(b.tag, f"{b.tag}c", b.users, 1)
        rate = args.dedicated_cold_rate

        def refilled() -> None:  # the producer's warm-up users claimed spares too
            if not p.wait_pool_full(300):
                raise RuntimeError("the pool did not refill after the warm-up records")

        b.emit_latency(
            "cold_start_pooled", rate, b.paced("cold", rate, cold, refilled), pool=size,
            at_once=p.settings.consume.dedicated_pool_starts_at_once,
        )  # fmt: skip
    finally:
        b.stop_all()
    return b.topics


def main() -> None:
    quick = quick_mode()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=default_runs(3))
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--per-user", type=int, default=2 if quick else 5, help="drain backlog")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--hosts", type=int, default=None, help="default: consume.num_hosts")
    ap.add_argument("--consumers", type=int, default=None, help="default: consume.num_consumers")
    ap.add_argument("--rate", type=float, default=2_000.0, help="hosted steady rate, msg/s")
    ap.add_argument("--paced-s", type=float, default=5.0 if quick else 10.0)
    ap.add_argument("--cold-users", type=int, default=500 if quick else 1_000)
    ap.add_argument("--cold-rate", type=float, default=250.0 if quick else 200.0)
    ap.add_argument("--dedicated-users", type=int, default=20 if quick else 50)
    ap.add_argument("--dedicated-per-user", type=int, default=50 if quick else 100)
    ap.add_argument("--dedicated-rate", type=float, default=200.0 if quick else 500.0)
    ap.add_argument("--dedicated-cold-rate", type=float, default=4.0 if quick else 2.0)
    ap.add_argument(
        "--dedicated-pool",
        type=int,
        default=None,
        help="dedicated_pool case: pool size (default: --dedicated-users; 0: skip)",
    )
    ap.add_argument(
        "--dedicated-pool-at-once",
        type=int,
        default=None,
        help="dedicated_pool case: consume.dedicated_pool_starts_at_once (default: its default)",
    )
    ap.add_argument(
        "--fetch-min-bytes",
        type=int,
        default=1,
        help="kafka.consumer.fetch_min_bytes (1: the broker answers a fetch at once)",
    )
    ap.add_argument(
        "--poll-linger-ms", type=float, default=None, help="consume.poll_linger_ms override"
    )
    ap.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=not quick,
        help="one unrecorded hosted run first (warms the broker JVM, Redis, Ray workers)",
    )
    ap.add_argument(
        "--steady-warmup-s",
        type=float,
        default=5.0 if quick else 20.0,
        help="paced warm-up at --rate before each steady window, recorded as warmup (0: none)",
    )
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["hosted", "concurrency", "dedicated", "dedicated_pool", "state"],
        default=None,
        help="run only these modes (each its --runs runs, in the usual order)",
    )
    ap.add_argument(
        "--state-bytes",
        type=int,
        default=0,
        help="> 0: also drain with per-user state of this size, off vs on (cases hosted_state_*)",
    )
    ap.add_argument(
        "--peer-concurrency",
        type=int,
        nargs="*",
        default=[64],
        help="concurrency mode: hosted drains at these total handler concurrencies "
        "(the peer bench's; none: skip)",
    )
    ap.add_argument(
        "--bursts",
        action="store_true",
        help="state mode: each user's messages back to back in the backlog (default round-robin)",
    )
    args = ap.parse_args()
    # Ray's driver prints raylet warnings to sys.stdout: keep stdout for JSON lines only.
    output._EMITTER.stream = sys.stdout
    sys.stdout = sys.stderr
    with bench_services() as svc:
        hosts = args.hosts or svc.settings.consume.num_hosts
        odd = [t for t in args.peer_concurrency if t < hosts or t % hosts]
        if odd:
            ap.error(f"--peer-concurrency {odd}: not a positive multiple of the {hosts} hosts")
        ray.init(
            address="local",  # never join a `ray start` cluster someone else runs here
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            namespace="bench",
        )
        topics: list[str] = []
        try:
            if args.warmup:
                # Discarded: a freshly started broker JVM is still JIT-compiling for its
                # first minutes (30-60 % of a core here), which lands on the first run's
                # latency phases; `make bench` runs other benches first, `--only` may not.
                # Recorded with run=-1 and warmup=true (its lines are evidence, not results).
                log("consume bench: warm-up run (recorded as warmup)")
                try:
                    topics += run_hosted(args, svc, -1)
                except Exception as exc:
                    log(f"consume bench: warm-up failed: {exc!r}")
            # Every hosted run first: a dedicated phase leaves dozens of Ray worker
            # processes exiting and the pool refilling (load 30+ here), which would
            # land on the next hosted run's latency phases.
            modes = [
                ("hosted", run_hosted),
                ("concurrency", run_concurrency),
                ("dedicated", run_dedicated),
                ("dedicated_pool", run_dedicated_pool),
            ]
            if args.state_bytes > 0:
                modes.insert(1, ("state", run_state))
            for mode, fn in modes:
                if args.only is not None and mode not in args.only:
                    continue
                for run in range(args.runs):
                    log(f"consume bench: run {run} {mode} (load {os.getloadavg()[0]:.1f})")
                    try:
                        topics += fn(args, svc, run)
                    except Exception as exc:  # record it; the other cases still run
                        emit(kind="error", case=mode, run=run, error=repr(exc)[:500])
        finally:
            ray.shutdown()
            if svc.external and topics:
                _delete_topics(svc.settings.kafka, topics)


if __name__ == "__main__":
    main()

"""HostCore's CPU per message, in memory (no Ray, Kafka or Redis): the host's own cost.

Why: the host's mailbox logic is on every message's path; a refactor of it (the
pure mailbox machine) must not make it dearer. 5,000 users x 4 messages, delivered in
batches of 500, a trivial handler, in-memory done-store; CPU time (time.process_time)
from the first batch to the last completion, per message. Prints one JSON line per case
per run (3; 1 with QYWX_BENCH_QUICK=1), via bench.output.emit; the best and the median
go to stderr. No parking lot (RetryOrder) in memory.

`--redis`: the same host over a real Redis it starts (done-store, the rate limiter, the
parking lot, and the one-call batch read when this checkout has consume/batch_reads.py),
each batch ingested before the next is handed over, so every delivery batch is one
admission. Reports the host's CPU µs/msg, msg/s, redis-server CPU µs/msg (INFO cpu) and
the admission round trips per batch (the dedup check, the limiter, the parking lot's
flag read and admit, or the batch read; done-flag writes are counted apart). Send times
are 3 s apart per user so the default rule (5 per 10 s) never denies. The module runs
unchanged on an older checkout (PYTHONPATH=/path/to/old python path/to/this/file.py).

`--redis --state-bytes N` (N > 0): per-user state off vs on over that Redis, alternating
per run: off = `bench_handler` (trivial, Envelope only), on = `bench_state_handler` (`@stateful`,
an N-byte state that changes on every message: every message pays the version-checked
commit of the whole state with its done-flag, and every user one load on activation);
the same envelopes (carrying `raw.state_bytes`) in both. Cases `redis_state_off` /
`redis_state_on`; the on - off difference of host CPU µs/msg goes to stderr.

    python -m bench.bench_host_cpu [--users 5000] [--per-user 4] [--batch 500] [--redis]
                                   [--state-bytes 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.output import emit
from bench.runs import default_runs
from qywx_ray.consume.dedup import Deduplicator, MemoryDoneStore
from qywx_ray.consume.handlers import HandlerContext
from qywx_ray.consume.types import DeadLetter, Delivery
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.envelope import Envelope


async def trivial(message: Any, ctx: HandlerContext) -> None:
    return None


class _Letters:
    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        return None


class _Completions:
    def __init__(self, want: int) -> None:
        self.n = 0
        self.want = want
        self.all_done = asyncio.Event()

    def complete(self, consumer: str, done: Sequence[tuple[str, int, int]]) -> None:
        self.n += len(done)
        if self.n >= self.want:
            self.all_done.set()


def _deliveries(
    users: int, per_user: int, send_time: int = 0, raw: dict[str, Any] | None = None
) -> list[Delivery]:
    out = []
    offset = 0
    for n in range(per_user):
        for u in range(users):
            user = f"u{u}"
            env = Envelope(
                message_id=f"{user}-m{n}",
                open_kfid="kf1",
                external_userid=user,
                msgtype="text",
                send_time=send_time + 3 * n if send_time else 0,
                raw=dict(raw or {}),
            )
            out.append(Delivery("t", 0, offset, 1_000, user, env.to_bytes(), env.message_id, "c0"))
            offset += 1
    return out


def run_on(loop: str, coro: Any) -> Any:
    """`coro` to completion on a fresh loop of the kind named (asyncio's or uvloop's)."""
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


async def _one(
    users: int, per_user: int, batch: int, sleep_ms: float = 0.0, concurrency: int = 1000
) -> float:
    from qywx_ray.consume.handlers import bench_handler  # awaits raw.sleep_ms

    items = _deliveries(users, per_user, raw={"sleep_ms": sleep_ms} if sleep_ms > 0 else None)
    completions = _Completions(len(items))
    core = HostCore(
        name="bench",
        handler=bench_handler if sleep_ms > 0 else trivial,
        dedup=Deduplicator(MemoryDoneStore()),
        completions=completions,
        dead_letters=_Letters(),
        options=CoreOptions(completion_flush_ms=5.0, handler_concurrency=concurrency),
    )
    t0 = time.process_time()
    for i in range(0, len(items), batch):
        core.accept(items[i : i + batch])
        await asyncio.sleep(0)
    await asyncio.wait_for(completions.all_done.wait(), timeout=300)
    cpu = time.process_time() - t0
    for w in core._workers:
        w.cancel()
    return cpu / len(items) * 1e6


class _Counter:
    """Counts the commands a client sends: admission ones (see module doc) and all."""

    def __init__(self, client: Any) -> None:
        import hashlib

        from qywx_ray.consume import dedup
        from qywx_ray.dlq import parking
        from qywx_ray.protect import ratelimit

        texts = [getattr(dedup, "_EXISTS_LUA"), getattr(parking, "_ADMIT")]  # noqa: B009
        texts.append(getattr(ratelimit, "_LUA"))  # noqa: B009
        try:
            from qywx_ray.consume import batch_reads

            texts.append(batch_reads.BATCH_LUA)
        except ImportError:
            pass
        self.texts = texts
        self.admission_scripts = set(texts) | {hashlib.sha1(t.encode()).hexdigest() for t in texts}
        self.admission = 0
        self.total = 0
        send = client.execute_command

        async def counted(*args: Any, **options: Any) -> Any:
            self.total += 1
            name = str(args[0]).upper()
            if name == "MGET" or (
                name in ("EVAL", "EVALSHA") and args[1] in self.admission_scripts
            ):
                self.admission += 1
            return await send(*args, **options)

        client.execute_command = counted


async def _one_redis(
    users: int, per_user: int, batch: int, url: str, state: str = "", state_bytes: int = 0
) -> dict[str, float]:
    """One drain; `state` "" = the plain bench, "off" / "on" = the state comparison.
    The client is the hosts' own (store.client.make_async_redis: pool, retry, packing)."""
    from qywx_ray.consume.dedup import RedisDoneStore
    from qywx_ray.dlq.parking import AsyncParkingLot
    from qywx_ray.dlq.settings import DLQSettings
    from qywx_ray.protect.admission import RateLimitAdmission
    from qywx_ray.protect.groups import UserGroups
    from qywx_ray.protect.ratelimit import RateLimiter
    from qywx_ray.protect.settings import ProtectSettings
    from qywx_ray.store.client import make_async_redis
    from qywx_ray.store.settings import RedisSettings

    client = make_async_redis(RedisSettings(url=url))
    await client.flushdb()
    counter = _Counter(client)
    settings = ProtectSettings()
    admission = RateLimitAdmission(RateLimiter(client, settings, UserGroups(settings, client)))
    lot = AsyncParkingLot(client, DLQSettings())
    extra: dict[str, Any] = {}
    try:
        from qywx_ray.consume.batch_reads import make_batch_reads

        extra["batch_reads"] = make_batch_reads(client, admission, lot)
    except ImportError:  # a checkout before the batch read: the separate calls
        pass
    raw = {"state_bytes": state_bytes} if state else None
    items = _deliveries(users, per_user, send_time=1_700_000_000, raw=raw)
    completions = _Completions(len(items))
    handler: Any = trivial
    if state == "off":
        # The state handler's pair, as in bench_consume's state mode: both read only the
        # Envelope (`trivial` takes the typed parse, which "on" does not pay)
        from qywx_ray.consume.handlers import bench_handler

        handler = bench_handler
    if state == "on":
        from qywx_ray.consume import state as state_mod
        from qywx_ray.consume.handlers import bench_state_handler

        handler = bench_state_handler
        extra["state_store"] = state_mod.RedisStateStore(client)
    core = HostCore(
        name="bench",
        handler=handler,
        dedup=Deduplicator(RedisDoneStore(client, 3600)),
        completions=completions,
        dead_letters=_Letters(),
        admission=admission,
        retry_order=lot,
        options=CoreOptions(completion_flush_ms=5.0, handler_concurrency=1000),
        **extra,
    )

    async def server_cpu() -> float:
        info = await client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    for text in counter.texts:  # loaded first: a NOSCRIPT retry is not a batch's cost
        await client.script_load(text)
    if state == "on":
        await client.script_load(state_mod.COMMIT_LUA)
    redis0 = await server_cpu()
    counter.admission = counter.total = 0
    t0, w0 = time.process_time(), time.perf_counter()
    batches = 0
    for i in range(0, len(items), batch):
        core.accept(items[i : i + batch])
        batches += 1
        assert core._ingest_task is not None
        await core._ingest_task  # one admission per delivery batch
    await asyncio.wait_for(completions.all_done.wait(), timeout=600)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    admission_calls, total = counter.admission, counter.total
    redis_cpu = await server_cpu() - redis0
    for w in core._workers:
        w.cancel()
    await client.aclose()
    n = len(items)
    return {
        "cpu_per_msg": cpu / n * 1e6,
        "msg_per_s": n / wall,
        "redis_cpu_per_msg": redis_cpu / n * 1e6,
        "admission_round_trips_per_batch": admission_calls / batches,
        "redis_commands_per_batch": total / batches,
    }


def _main_redis(a: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from qywx_ray.devstack.redis import RedisServer

    units = {
        "cpu_per_msg": "us/msg",
        "msg_per_s": "msg/s",
        "redis_cpu_per_msg": "us/msg",
        "admission_round_trips_per_batch": "calls",
        "redis_commands_per_batch": "calls",
    }
    if a.tune_gc:  # as the consume hosts do once built (consume/hosts.py)
        import importlib

        try:
            tuning = importlib.import_module("qywx_ray.process_tuning")
        except ImportError:  # an older checkout: the hosts' own copy
            tuning = importlib.import_module("qywx_ray.consume.hosts")
        tuning.tune_gc()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            cases = ["off", "on"] if a.state_bytes > 0 else [""]
            by_case: dict[str, list[dict[str, float]]] = {c: [] for c in cases}
            for run in range(a.runs):
                for state in cases if run % 2 == 0 else cases[::-1]:
                    got = run_on(
                        a.loop,
                        _one_redis(a.users, a.per_user, a.batch, server.url, state, a.state_bytes),
                    )
                    by_case[state].append(got)
                    for metric, value in got.items():
                        emit(
                            bench="host_cpu",
                            case=f"redis_state_{state}" if state else "redis",
                            stage="host",
                            metric=metric,
                            value=round(value, 2),
                            unit=units[metric],
                            run=run,
                            users=a.users,
                            per_user=a.per_user,
                            batch=a.batch,
                            loop=a.loop,
                            **({"state_bytes": a.state_bytes} if state else {}),
                        )
        finally:
            server.stop()
    med = {
        c: {m: statistics.median(r[m] for r in runs) for m in units} for c, runs in by_case.items()
    }
    for c, values in med.items():
        for metric, value in values.items():
            print(
                f"host_cpu redis{c and '_state_' + c} {metric}: median {value:.2f}", file=sys.stderr
            )
    if a.state_bytes > 0:
        for metric in ("cpu_per_msg", "redis_cpu_per_msg"):
            diff = med["on"][metric] - med["off"][metric]
            print(f"host_cpu state on - off {metric}: {diff:+.2f} us/msg", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--per-user", type=int, default=4)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runs", type=int, default=default_runs(3))
    ap.add_argument("--redis", action="store_true", help="over a real Redis (see module doc)")
    ap.add_argument(
        "--tune-gc",
        action="store_true",
        help="with --redis: the consume hosts' GC tuning first (freeze, gen0 threshold)",
    )
    ap.add_argument("--state-bytes", type=int, default=0, help="> 0 with --redis: state off/on")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    ap.add_argument(
        "--sleep-ms", type=float, default=0.0, help="in memory: the handler awaits this long"
    )
    ap.add_argument("--concurrency", type=int, default=1000, help="in memory: handler_concurrency")
    a = ap.parse_args()
    if a.redis:
        _main_redis(a)
        return
    runs = []
    for run in range(a.runs):
        us = run_on(a.loop, _one(a.users, a.per_user, a.batch, a.sleep_ms, a.concurrency))
        runs.append(us)
        emit(
            bench="host_cpu",
            case="in_memory",
            stage="host",
            metric="cpu_per_msg",
            value=round(us, 2),
            unit="us/msg",
            run=run,
            users=a.users,
            per_user=a.per_user,
            batch=a.batch,
            loop=a.loop,
            sleep_ms=a.sleep_ms,
            concurrency=a.concurrency,
        )
    print(
        f"host_cpu: best {min(runs):.2f} us/msg, median {statistics.median(runs):.2f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

"""The per-user state commit path alone: COMMIT_LUA on a real Redis, no Kafka, no Ray.

Why: `bench_consume.py --only state` measures what state costs a message end to end, on
a shared machine where the host, the consumers and Redis compete for 2 cores; this one
isolates the commit: the client's CPU to group, pack and send a flush's writes
(commit_args + EVALSHA) and Redis's CPU to run the script, per commit.

Cases (the same writes in each; `--per-user` successive 1 KiB-state writes per user, all
of a user's writes in the same flush of `--batch` writes):
  grouped    RedisDoneStore.commit: one conditional write per user and flush
  ungrouped  one group per write (what the script did before grouping: every
             intermediate state sent and written)
  plain      done-flags only (RedisDoneStore.mark_done: what a stateless handler pays)

Prints JSON lines (bench.output.emit) per case and run: commits/s, wall µs/commit, client
CPU µs/commit, Redis CPU µs/commit (INFO cpu) and Redis's time executing the commands
µs/commit (INFO commandstats, without network and parsing); medians of the runs go to
stderr. Starts a throwaway Redis (stopped by PID) unless QYWX_BENCH_REDIS_URL is set.

    python -m bench.bench_state_commit [--users 2000] [--per-user 5] [--state-bytes 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis as redis_lib

from bench.output import emit, log
from bench.runs import default_runs
from qywx_ray.consume.dedup import DONE_KEY, RedisDoneStore
from qywx_ray.consume.state import (
    COMMIT_LUA,
    StateWrite,
    WriteGroup,
    group_args,
)
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings

CASES = ("grouped", "ungrouped", "plain")


@contextmanager
def redis_url() -> Iterator[str]:
    url = os.environ.get("QYWX_BENCH_REDIS_URL")
    if url:
        yield url
        return
    from qywx_ray.devstack.redis import RedisServer

    # Its data directory goes with it: a run's AOF and RDB are tens of MiB
    with tempfile.TemporaryDirectory(
        prefix="qywx-bench-commit-",
        ignore_cleanup_errors=True,  # a save child may still exit
    ) as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            yield server.url
        finally:
            if server.process is not None:
                server.process.stop()


def redis_cpu_s(client: redis_lib.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_exec_s(client: redis_lib.Redis) -> float:
    """Redis's own time running commands (INFO commandstats, all of them): the scripts'
    execution without the network, parsing and background threads INFO cpu also counts;
    steadier than INFO cpu's 10 ms ticks."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(float(v["usec"]) for v in stats.values()) / 1e6


def flushes(tag: str, users: int, per_user: int, batch: int, pad: int) -> list[list[Any]]:
    """Each flush: (message id, StateWrite) for `batch // per_user` users, every one of
    them with its `per_user` successive writes (v0 -> v1 -> ...)."""
    out: list[list[Any]] = []
    cur: list[Any] = []
    for u in range(users):
        for n in range(per_user):
            data = b'{"pad":"' + b"x" * pad + b'","n":' + str(n + 1).encode() + b"}"
            cur.append((f"{tag}-{u}-{n}", StateWrite(f"{tag}u{u}", n, data)))
        if len(cur) >= batch:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def singletons(writes: list[tuple[str, StateWrite]]) -> list[WriteGroup]:
    return [
        WriteGroup(w.user, w.expected_version, w.expected_version + 1, w.data, [mid])
        for mid, w in writes
    ]


async def one(case: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    client = make_async_redis(RedisSettings(url=url))  # the hosts' client
    sync = redis_lib.Redis.from_url(url)
    store = RedisDoneStore(client, ttl_s=600, state_ttl_s=600)
    script = client.register_script(COMMIT_LUA)
    tag = uuid.uuid4().hex[:8]
    batches = flushes(tag, args.users, args.per_user, args.batch, args.state_bytes)
    await store.mark_done(["warm"])
    await script(keys=["qywx:bench:warm"], args=[0, 1, 1, b""])  # loaded: EVALSHA from here on
    n = sum(len(b) for b in batches)
    exec0, redis0 = redis_exec_s(sync), redis_cpu_s(sync)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for batch in batches:
        if case == "plain":
            await store.mark_done([mid for mid, _ in batch])
            continue
        if case == "grouped":
            refused = await store.commit([], batch, uuid.uuid4().hex)
            assert not refused, f"{case}: refused {refused}"
            continue
        keys, argv = group_args(uuid.uuid4().hex, [], singletons(batch), DONE_KEY.format, 600, 600)
        refused = await script(keys=keys, args=argv)
        assert not refused, f"{case}: refused {refused}"
    wall = time.perf_counter() - wall0
    cpu, redis_cpu = time.process_time() - cpu0, redis_cpu_s(sync) - redis0
    redis_exec = redis_exec_s(sync) - exec0
    await client.aclose()
    sync.close()
    return {
        "commits_per_s": n / wall,
        "wall_us": wall / n * 1e6,
        "client_cpu_us": cpu / n * 1e6,
        "redis_cpu_us": redis_cpu / n * 1e6,
        "redis_exec_us": redis_exec / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--per-user", type=int, default=5, help="successive writes per user")
    ap.add_argument("--batch", type=int, default=500, help="writes per flush (one call)")
    ap.add_argument("--state-bytes", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=default_runs(3))
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CASES}
    with redis_url() as url:
        for run in range(args.runs):
            for case in CASES if run % 2 == 0 else CASES[::-1]:
                got = asyncio.run(one(case, url, args))
                results[case].append(got)
                for metric, value in got.items():
                    emit(
                        bench="state_commit",
                        case=case,
                        metric=metric,
                        value=round(value, 2),
                        unit="1/s" if metric == "commits_per_s" else "us/commit",
                        run=run,
                        users=args.users,
                        per_user=args.per_user,
                        batch=args.batch,
                        state_bytes=args.state_bytes,
                    )
    for case, runs in results.items():
        med = {m: statistics.median(r[m] for r in runs) for m in runs[0]}
        log(f"state_commit {case}: " + ", ".join(f"{m} {v:,.1f}" for m, v in med.items()))


if __name__ == "__main__":
    main()

"""HostCore's CPU per message, in memory (no Ray, Kafka or Redis): the host's own cost.

Why: the host's mailbox logic is on every message's path; a refactor of it (issue 15's
pure mailbox machine) must not make it dearer. 5,000 users x 4 messages, delivered in
batches of 500, a trivial handler, in-memory done-store; CPU time (time.process_time)
from the first batch to the last completion, per message. Prints one JSON line per case
per run (3; 1 with QYWX_BENCH_QUICK=1), via bench.output.emit; the best and the median
go to stderr. No parking lot (RetryOrder): that one is a
Redis round trip per batch, measured with the real Redis in bench_consume.py.

    python -m bench.bench_host_cpu [--users 5000] [--per-user 4] [--batch 500]
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


def _deliveries(users: int, per_user: int) -> list[Delivery]:
    out = []
    offset = 0
    for n in range(per_user):
        for u in range(users):
            user = f"u{u}"
            env = Envelope(
                message_id=f"{user}-m{n}", open_kfid="kf1", external_userid=user, msgtype="text"
            )
            out.append(Delivery("t", 0, offset, 1_000, user, env.to_bytes(), env.message_id, "c0"))
            offset += 1
    return out


async def _one(users: int, per_user: int, batch: int) -> float:
    items = _deliveries(users, per_user)
    completions = _Completions(len(items))
    core = HostCore(
        name="bench",
        handler=trivial,
        dedup=Deduplicator(MemoryDoneStore()),
        completions=completions,
        dead_letters=_Letters(),
        options=CoreOptions(completion_flush_ms=5.0, handler_concurrency=1000),
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=5000)
    ap.add_argument("--per-user", type=int, default=4)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--runs", type=int, default=default_runs(3))
    a = ap.parse_args()
    runs = []
    for run in range(a.runs):
        us = asyncio.run(_one(a.users, a.per_user, a.batch))
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
        )
    print(
        f"host_cpu: best {min(runs):.2f} us/msg, median {statistics.median(runs):.2f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

"""Run the ingest simulator over seeds.

    python -m tests.sim_ingest.run --seeds 0:1000 --jobs 2   # a range (end excluded)
    python -m tests.sim_ingest.run --seeds 0:3000 --list     # one line per failing seed
    python -m tests.sim_ingest.run --seed 17 --trace         # replay one seed, every event
    python -m tests.sim_ingest.run --seeds 0:500 --without pause,redis_flaky

A failing seed prints the invariant, the scenario, the last events and the command that
replays it; the same seed always replays the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from tests.sim_ingest.faults import KINDS
from tests.sim_ingest.sim import STALL_BOUND_S, Result, run_seed

TAIL = 40


def replay_command(seed: int, without: frozenset[str]) -> str:
    extra = f" --without {','.join(sorted(without))}" if without else ""
    return f"python -m tests.sim_ingest.run --seed {seed} --trace{extra}"


def report(result: Result, without: frozenset[str], tail: int = TAIL) -> str:
    lines = [
        f"seed {result.seed} FAILED: {result.violations[0]}",
        *(f"  also: {v}" for v in result.violations[1:4]),
        f"  scenario: {result.summary}",
        f"  last {tail} events:",
        *(f"    {e}" for e in result.trace[-tail:]),
        f"  replay: {replay_command(result.seed, without)}",
    ]
    return "\n".join(lines)


def _one(args: tuple[int, frozenset[str], float]) -> Result:
    seed, without, bound_s = args
    return run_seed(seed, without=without, stall_bound_s=bound_s)


def run_many(
    seeds: Iterable[int],
    without: frozenset[str] = frozenset(),
    stall_bound_s: float = STALL_BOUND_S,
    jobs: int = 1,
    deadline_s: float | None = None,
) -> Iterator[Result]:
    """Results in seed order; stops starting new seeds after `deadline_s` (wall)."""
    start = time.monotonic()
    work = [(s, without, stall_bound_s) for s in seeds]
    block = 1 if jobs <= 1 else 4 * jobs  # the deadline is checked between blocks
    pool = None
    if jobs > 1:
        pool = multiprocessing.get_context("spawn").Pool(jobs)  # safe where threads run
    try:
        for i in range(0, len(work), block):
            if deadline_s is not None and time.monotonic() - start >= deadline_s:
                return
            chunk = work[i : i + block]
            yield from (pool.imap(_one, chunk) if pool is not None else map(_one, chunk))
    finally:
        if pool is not None:
            pool.terminate()


def parse_range(text: str) -> range:
    lo, _, hi = text.partition(":")
    return range(int(lo), int(hi) if hi else int(lo) + 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim_ingest.run", description=__doc__)
    ap.add_argument("--seeds", default="0:200", help="LO:HI, HI excluded")
    ap.add_argument("--seed", type=int, help="one seed")
    ap.add_argument("--trace", action="store_true", help="print every event of the run")
    ap.add_argument("--without", default="", help=f"fault kinds off: {','.join(KINDS)}")
    ap.add_argument("--stall-bound", type=float, default=STALL_BOUND_S, help="stall bound (s)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--max-failures", type=int, default=3, help="reports printed in full")
    ap.add_argument("--list", action="store_true", help="one line per failing seed")
    args = ap.parse_args(argv)
    without = frozenset(k for k in args.without.split(",") if k)
    unknown = without - set(KINDS)
    if unknown:
        ap.error(f"unknown fault kinds: {sorted(unknown)}")
    if args.seed is not None:
        result = run_seed(
            args.seed, without=without, stall_bound_s=args.stall_bound, echo=args.trace
        )
        print(f"scenario: {result.summary}")
        print(
            f"virtual {result.virtual_s:.1f}s, {result.steps} steps, {result.messages} messages, "
            f"{result.kafka_records} Kafka records"
        )
        print(report(result, without) if not result.ok else f"seed {args.seed} ok")
        return 0 if result.ok else 1
    t0 = time.monotonic()
    failed: Counter[str] = Counter()
    examples: dict[str, list[int]] = {}
    n = shown = 0
    for result in run_many(parse_range(args.seeds), without, args.stall_bound, args.jobs):
        n += 1
        if result.ok:
            continue
        failed[result.invariant] += 1
        examples.setdefault(result.invariant, []).append(result.seed)
        if args.list:
            print(f"seed {result.seed}: {result.violations[0]}")
        elif shown < args.max_failures:
            shown += 1
            print(report(result, without), end="\n\n")
    wall = time.monotonic() - t0
    print(f"{n} seeds in {wall:.1f}s ({n / wall:.1f} seeds/s), {sum(failed.values())} failed")
    for inv, count in failed.most_common():
        print(f"  {inv}: {count} seeds, e.g. {examples[inv][:8]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""What every deterministic simulator here shares: the seed loop, jobs, reports, the CLI.

A simulator (tests/sim: the consume core; tests/sim_ingest: the ingest) brings one
function, `run_one(seed, without, bound, echo) -> result`, and a `SimCli` saying how it is
called; this module runs seeds over processes, reports failing seeds with their replay
command, and gives the pytest batches their verdict. It knows nothing of what is
simulated. `run_one` must be a module-level function (worker processes import it).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TAIL = 40


class SeedResult(Protocol):
    """What a simulator's result must offer (tests/sim/sim.py and tests/sim_ingest/sim.py)."""

    seed: int
    violations: list[str]
    trace: list[str]
    summary: str
    notes: list[str]

    @property
    def ok(self) -> bool: ...

    @property
    def invariant(self) -> str: ...


RunOne = Callable[[int, frozenset[str], float, bool], SeedResult]


@dataclass(frozen=True)
class SimCli:
    prog: str  # "python -m tests.sim.run": also what a report's replay line says
    doc: str
    kinds: Sequence[str]  # fault kinds `--without` may switch off
    run_one: RunOne
    bound_flag: str  # the simulator's one tunable bound, e.g. "--pin-bound"
    bound_default: float
    bound_help: str
    describe: Callable[[SeedResult], str]  # the stats line of a single-seed run
    block_per_job: int = 16  # seeds per job between deadline checks
    max_failures: int = 5  # reports printed in full
    # ("drain pin", result -> seconds): the largest over the run goes in the summary line
    max_stat: tuple[str, Callable[[SeedResult], float]] | None = None

    def report(self, result: SeedResult, without: frozenset[str] = frozenset()) -> str:
        return report(self.prog, result, without)

    def run_many(
        self,
        seeds: Iterable[int],
        without: frozenset[str] = frozenset(),
        jobs: int = 1,
        deadline_s: float | None = None,
        bound: float | None = None,
    ) -> Iterator[SeedResult]:
        b = self.bound_default if bound is None else bound
        return run_many(self.run_one, seeds, without, b, jobs, deadline_s, self.block_per_job)

    def check_batch(self, seeds: range, jobs: int, deadline_s: float | None) -> int:
        """For the pytest batches: how many seeds ran; pytest.fail with the failing seeds
        and the first three reports if any broke an invariant."""
        import pytest

        failed: list[SeedResult] = []
        n = 0
        for result in self.run_many(seeds, jobs=jobs, deadline_s=deadline_s):
            n += 1
            if not result.ok:
                failed.append(result)
        assert n > 0
        if failed:
            shown = "\n\n".join(self.report(r) for r in failed[:3])
            seeds_line = ", ".join(f"{r.seed} ({r.invariant})" for r in failed[:20])
            pytest.fail(
                f"{len(failed)} of {n} seeds failed: {seeds_line}\n\n{shown}", pytrace=False
            )
        return n


def replay_command(prog: str, seed: int, without: frozenset[str]) -> str:
    extra = f" --without {','.join(sorted(without))}" if without else ""
    return f"{prog} --seed {seed} --trace{extra}"


def report(prog: str, result: SeedResult, without: frozenset[str], tail: int = TAIL) -> str:
    """A failing seed: its invariant, the scenario, the last events, how to replay it."""
    lines = [
        f"seed {result.seed} FAILED: {result.violations[0]}",
        *(f"  also: {v}" for v in result.violations[1:4]),
        f"  scenario: {result.summary}",
        *(f"  note: {n}" for n in result.notes[:3]),
        f"  last {tail} events:",
        *(f"    {e}" for e in result.trace[-tail:]),
        f"  replay: {replay_command(prog, result.seed, without)}",
    ]
    return "\n".join(lines)


def _call(run_one: RunOne, args: tuple[int, frozenset[str], float]) -> SeedResult:
    seed, without, bound = args
    return run_one(seed, without, bound, False)


def run_many(
    run_one: RunOne,
    seeds: Iterable[int],
    without: frozenset[str],
    bound: float,
    jobs: int = 1,
    deadline_s: float | None = None,
    block_per_job: int = 16,
) -> Iterator[SeedResult]:
    """Results in seed order; stops starting new seeds after `deadline_s` (wall), checked
    every seed with one job and every `block_per_job * jobs` seeds with more."""
    start = time.monotonic()
    work = [(s, without, bound) for s in seeds]
    block = 1 if jobs <= 1 else block_per_job * jobs
    one = functools.partial(_call, run_one)
    pool = None
    if jobs > 1:
        pool = multiprocessing.get_context("spawn").Pool(jobs)  # safe where threads run
    try:
        for i in range(0, len(work), block):
            if deadline_s is not None and time.monotonic() - start >= deadline_s:
                return
            chunk = work[i : i + block]
            yield from (pool.imap(one, chunk) if pool is not None else map(one, chunk))
    finally:
        if pool is not None:
            pool.terminate()


def parse_range(text: str) -> range:
    lo, _, hi = text.partition(":")
    return range(int(lo), int(hi) if hi else int(lo) + 1)


def main(cli: SimCli, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=cli.prog, description=cli.doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="0:200", help="LO:HI, HI excluded")
    ap.add_argument("--seed", type=int, help="one seed")
    ap.add_argument("--trace", action="store_true", help="print every event of the run")
    ap.add_argument("--without", default="", help=f"fault kinds off: {','.join(cli.kinds)}")
    ap.add_argument(
        cli.bound_flag, dest="bound", type=float, default=cli.bound_default, help=cli.bound_help
    )
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--max-failures", type=int, default=cli.max_failures)
    ap.add_argument("--list", action="store_true", help="one line per failing seed")
    args = ap.parse_args(argv)
    without = frozenset(k for k in args.without.split(",") if k)
    unknown = without - set(cli.kinds)
    if unknown:
        ap.error(f"unknown fault kinds: {sorted(unknown)}")
    if args.seed is not None:
        result = cli.run_one(args.seed, without, args.bound, args.trace)
        print(f"scenario: {result.summary}")
        print(cli.describe(result))
        print(report(cli.prog, result, without) if not result.ok else f"seed {args.seed} ok")
        return 0 if result.ok else 1
    t0 = time.monotonic()
    failed: Counter[str] = Counter()
    examples: dict[str, list[int]] = {}
    n = shown = 0
    stat = 0.0
    results = run_many(
        cli.run_one,
        parse_range(args.seeds),
        without,
        args.bound,
        args.jobs,
        block_per_job=cli.block_per_job,
    )
    for result in results:
        n += 1
        if cli.max_stat is not None:
            stat = max(stat, cli.max_stat[1](result))
        if result.ok:
            continue
        failed[result.invariant] += 1
        examples.setdefault(result.invariant, []).append(result.seed)
        if args.list:
            print(f"seed {result.seed}: {result.violations[0]}")
        elif shown < args.max_failures:
            shown += 1
            print(report(cli.prog, result, without), end="\n\n")
    wall = time.monotonic() - t0
    line = f"{n} seeds in {wall:.1f}s ({n / wall:.1f} seeds/s), {sum(failed.values())} failed"
    if cli.max_stat is not None:
        line += f"; max {cli.max_stat[0]} {stat:.2f}s (bound {args.bound}s)"
    print(line, flush=True)
    for inv, count in failed.most_common():
        print(f"  {inv}: {count} seeds, e.g. {examples[inv][:8]}")
    return 1 if failed else 0


def patch(path: str, old: str, new: str, count: int = 1) -> None:
    """For the re-inject scripts: replace `old` (exactly `count` times) in one file."""
    p = Path(path)
    s = p.read_text()
    assert s.count(old) == count, (path, old[:60], s.count(old))
    p.write_text(s.replace(old, new))

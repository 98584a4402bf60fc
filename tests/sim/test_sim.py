"""Deterministic simulation of the consume path (see tests/sim/sim.py).

The unmarked batch runs in `make test` (time-boxed); the slow one (>= 10,000 seeds) in
`make drills`. A failure lists the failing seeds with their last events and the command
that replays one: `python -m tests.sim.run --seed N --trace`.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.sim import adapter
from tests.sim.run import CLI
from tests.sim.sim import run_seed
from tests.sim.vtime import VirtualTimeLoop, run_virtual

QUICK_SEEDS = range(0, 3000)
QUICK_DEADLINE_S = 45.0  # wall; `make test` must stay within a minute on 2 cores
SLOW_SEEDS = range(100_000, 110_000)
# Seeds outside QUICK_SEEDS that once found a defect: they run in every batch.
# 106340: policy process, a host crash after a state commit before its offset commit,
# Redis down at the re-delivery: the done message ran again on a state holding it
# (106239 finds the same defect once put back: `tests/sim/reinject.py 11`).
PINNED_SEEDS = (106_239, 106_340)
JOBS = max(1, min(2, os.cpu_count() or 1))

known_broken = pytest.mark.xfail(
    adapter.KNOWN_BROKEN,
    reason="today's HostCore fails the simulator's invariants (adapter.KNOWN_BROKEN); "
    "run `python -m tests.sim.run --seeds 0:3000` for the failing seeds",
    strict=True,
)


def check_batch(seeds: range, deadline_s: float | None) -> None:
    CLI.check_batch(seeds, JOBS, deadline_s)


def test_virtual_time_sleeps_without_waiting() -> None:
    loop = VirtualTimeLoop()
    woke: list[float] = []

    async def main() -> None:
        await asyncio.sleep(3600)
        woke.append(asyncio.get_running_loop().time())
        await asyncio.wait_for(asyncio.sleep(10), timeout=20)
        woke.append(asyncio.get_running_loop().time())

    t0 = time.monotonic()
    run_virtual(loop, main())
    assert woke == [3600.0, 3610.0]
    # Virtual: the hour was never slept. What the loop decided is checked above; wall
    # time only as a generous guard (a real sleep would take 3,610 s).
    assert time.monotonic() - t0 < 60.0


@pytest.mark.parametrize("seed", [1, 7])
def test_a_seed_replays_exactly(seed: int) -> None:
    """Seed 1 retries a dead letter with jittered backoff: the jitter must come from the
    seeded generator too (it once came from a private unseeded one)."""
    a, b = run_seed(seed), run_seed(seed)
    assert a.trace == b.trace
    assert a.violations == b.violations
    assert a.steps == b.steps
    assert run_seed(seed + 1).trace != a.trace


@pytest.mark.parametrize("seed", PINNED_SEEDS)
def test_pinned_seed_keeps_the_invariants(seed: int) -> None:
    result = run_seed(seed)
    assert result.violations == [], f"python -m tests.sim.run --seed {seed} --trace"


@known_broken
def test_simulated_seeds_keep_the_invariants() -> None:
    check_batch(QUICK_SEEDS, QUICK_DEADLINE_S)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@known_broken
def test_simulated_seeds_keep_the_invariants_long_run() -> None:
    check_batch(SLOW_SEEDS, None)

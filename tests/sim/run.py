"""Run the simulator over seeds.

    python -m tests.sim.run --seeds 0:1000            # a range (end excluded)
    python -m tests.sim.run --seed 17 --trace         # replay one seed, full event trace
    python -m tests.sim.run --seeds 0:500 --without cancel,process   # fault kinds off

A failing seed prints the invariant, the scenario, the last events and the command that
replays it; the same seed always replays the same run. The seed loop, jobs and reports
are tests/simkit/runner.py's, shared with the ingest simulator.
"""

from __future__ import annotations

import sys
from typing import Any

from tests.sim.faults import KINDS
from tests.sim.sim import Result, run_seed
from tests.simkit import runner

PIN_BOUND_S = 30.0


def run_one(seed: int, without: frozenset[str], pin_bound_s: float, echo: bool) -> Result:
    return run_seed(seed, without=without, pin_bound_s=pin_bound_s, echo=echo)


def describe(result: Any) -> str:
    return (
        f"virtual {result.virtual_s:.1f}s, {result.steps} steps, {result.messages} messages, "
        f"{result.handler_runs} handler runs, max drain pin {result.max_pinned_s:.2f}s"
    )


CLI = runner.SimCli(
    prog="python -m tests.sim.run",
    doc=__doc__ or "",
    kinds=KINDS,
    run_one=run_one,
    bound_flag="--pin-bound",
    bound_default=PIN_BOUND_S,
    bound_help="commit_pinned bound (s)",
    describe=describe,
    block_per_job=16,
    max_failures=5,
    max_stat=("drain pin", lambda r: float(r.max_pinned_s)),  # type: ignore[attr-defined]
)


def main(argv: list[str] | None = None) -> int:
    return runner.main(CLI, argv)


if __name__ == "__main__":
    sys.exit(main())

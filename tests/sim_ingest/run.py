"""Run the ingest simulator over seeds.

    python -m tests.sim_ingest.run --seeds 0:1000 --jobs 2   # a range (end excluded)
    python -m tests.sim_ingest.run --seeds 0:3000 --list     # one line per failing seed
    python -m tests.sim_ingest.run --seed 17 --trace         # replay one seed, every event
    python -m tests.sim_ingest.run --seeds 0:500 --without pause,redis_flaky

A failing seed prints the invariant, the scenario, the last events and the command that
replays it; the same seed always replays the same run. The seed loop, jobs and reports
are tests/simkit/runner.py's, shared with the consume simulator.
"""

from __future__ import annotations

import sys
from typing import Any

from tests.sim_ingest.faults import KINDS
from tests.sim_ingest.sim import STALL_BOUND_S, Result, run_seed
from tests.simkit import runner


def run_one(seed: int, without: frozenset[str], stall_bound_s: float, echo: bool) -> Result:
    return run_seed(seed, without=without, stall_bound_s=stall_bound_s, echo=echo)


def describe(result: Any) -> str:
    return (
        f"virtual {result.virtual_s:.1f}s, {result.steps} steps, {result.messages} messages, "
        f"{result.kafka_records} Kafka records, {result.producers_rebuilt} producers rebuilt"
    )


CLI = runner.SimCli(
    prog="python -m tests.sim_ingest.run",
    doc=__doc__ or "",
    kinds=KINDS,
    run_one=run_one,
    bound_flag="--stall-bound",
    bound_default=STALL_BOUND_S,
    bound_help="stall bound (s of fault-free time)",
    describe=describe,
    block_per_job=4,  # a seed takes longer here: the make-test deadline is checked sooner
    max_failures=3,
)


def main(argv: list[str] | None = None) -> int:
    return runner.main(CLI, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Deterministic simulation of the ingest (see tests/sim_ingest/sim.py and README.md).

The unmarked batch runs in `make test` (time-boxed: it stops starting seeds after
QUICK_DEADLINE_S of wall time); the slow one (10,000 seeds) in `make drills`. A failure
lists the failing seeds with their last events and the command that replays one:
`python -m tests.sim_ingest.run --seed N --trace`.
"""

from __future__ import annotations

import os

import pytest

from tests.sim_ingest.run import CLI
from tests.sim_ingest.sim import run_seed

QUICK_SEEDS = range(0, 2000)
QUICK_DEADLINE_S = 35.0  # wall; the batch stays under a minute on this loaded 2-core box
SLOW_SEEDS = range(100_000, 110_000)
JOBS = max(1, min(2, os.cpu_count() or 1))


def test_a_seed_replays_exactly() -> None:
    a, b = run_seed(5), run_seed(5)
    assert a.trace == b.trace
    assert a.violations == b.violations
    assert a.steps == b.steps
    assert a.kafka_records > 0
    assert run_seed(6).trace != a.trace


def test_a_defect_is_reported_with_its_seed_and_replay_command() -> None:
    """The ledger's verdict reaches the report: a stall bound no run can meet fails."""
    result = run_seed(5, stall_bound_s=0.0)
    assert result.invariant == "stalled"
    text = CLI.report(result)
    assert "seed 5 FAILED: stalled" in text
    assert "python -m tests.sim_ingest.run --seed 5 --trace" in text


def test_fatal_producer_errors_cost_only_what_was_in_flight() -> None:
    """Seed 8 hits fatal producer errors on the real KafkaIngestProducer
    over the fake librdkafka: the producer is rebuilt and nothing is lost. With the
    rebuild taken out (`reinject.py 6`) the same seed fails `dead_producer`."""
    result = run_seed(8)
    assert result.producers_rebuilt > 0
    assert result.ok, result.violations


def test_simulated_ingest_seeds_keep_the_invariants() -> None:
    n = CLI.check_batch(QUICK_SEEDS, JOBS, QUICK_DEADLINE_S)
    print(f"ingest simulator: {n} seeds from {QUICK_SEEDS.start}, 0 violations")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_simulated_ingest_seeds_keep_the_invariants_long_run() -> None:
    assert CLI.check_batch(SLOW_SEEDS, JOBS, None) == len(SLOW_SEEDS)

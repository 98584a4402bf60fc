"""Where results go and how many runs: the knobs every bench reads from the environment."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

QUICK_ENV = "QYWX_BENCH_QUICK"
RUNS_ENV = "QYWX_BENCH_RUNS"
BOOTSTRAP_ENV = "QYWX_BENCH_BOOTSTRAP"
REDIS_ENV = "QYWX_BENCH_REDIS_URL"
RUN_ID_ENV = "QYWX_BENCH_RUN_ID"

# Keys that are never a grouping dimension of a measurement (they vary run to run).
VOLATILE_KEYS = frozenset(
    {"value", "run", "ts", "run_id", "extra", "kind", "load1", "topic", "group", "elapsed_s"}
)


def quick_mode() -> bool:
    """QYWX_BENCH_QUICK=1: a short smoke run (one run, small volumes)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def default_runs(default: int = 3) -> int:
    """How many repeated runs: 1 in quick mode, else QYWX_BENCH_RUNS or `default`."""
    if quick_mode():
        return 1
    raw = os.environ.get(RUNS_ENV, "")
    return max(1, int(raw)) if raw.strip() else default

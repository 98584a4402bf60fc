"""Turn bench/results/*.jsonl into bench/REPORT.md (+ PNG charts when matplotlib is present).

Per bench: the median of repeated runs with min/max, each throughput beside its Kafka
ceiling from the same harness run, the machine facts, and the harness status of every
bench (a failed or timed-out bench is reported, not hidden). Reads results only; never
runs a benchmark and never needs a service. Charts are optional: without matplotlib
(the `bench` extra) the report is still written in full.

  python -m bench.report [--results bench/results] [--out bench/REPORT.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.charts import write_charts, write_peer_chart
from bench.render import render_report
from bench.results import load_results
from bench.runs import RESULTS_DIR


def write_report(results_dir: Path = RESULTS_DIR, out_path: Path | None = None) -> Path:
    out_path = out_path or results_dir.parent / "REPORT.md"
    machine, benches = load_results(results_dir)
    charts = write_charts(benches, results_dir) + write_peer_chart(benches, results_dir)
    text = render_report(machine, benches, charts, base_dir=out_path.parent)
    out_path.write_text(text, encoding="utf-8")
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    path = write_report(args.results, args.out)
    print(f"report written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

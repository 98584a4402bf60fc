"""Reading bench/results/*.jsonl: measurements normalised to rows (median, min, max per
case), and which Kafka ceiling from the same harness run each throughput is read against."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.runs import VOLATILE_KEYS
from bench.stats import median

CEILING_BENCH = "kafka_ceiling"
# Which ceiling cases a stage's throughput is read against, best client first.
CEILINGS_BY_STAGE: dict[str, tuple[str, ...]] = {
    "produce": ("raw_produce", "kafka_perf_produce"),
    "consume": ("raw_consume", "kafka_perf_consume"),
}
# Line kinds that carry a whole result for a dedicated report section.
SECTION_KINDS = frozenset({"profile", "stress_step", "stress_summary", "peer_context"})
# The peer (Confluent Parallel Consumer) and the bench whose hosted drains it is read against.
PEER_BENCH = "peer_parallel_consumer"
OURS_BENCH = "consume"
# Keys that describe the record itself rather than a grouping dimension.
RECORD_KEYS = frozenset({"bench", "case", "metric", "unit", "ceiling", "error", "status"})
# Legacy lines (no metric/value): numeric fields with these suffixes are metrics.
LEGACY_METRIC_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_per_s", "/s"),
    ("_ms", "ms"),
    ("_mib_s", "MiB/s"),
)
# Legacy numbers that are inputs (grouping dimensions) rather than results; any other
# number that is not a metric is taken as a per-run detail and ignored.
LEGACY_NUMERIC_DIMS = frozenset(
    {
        "users",
        "partitions",
        "brokers",
        "page",
        "concurrency",
        "record_size",
        "envelope_bytes",
        "payload_bytes",
        "hosts",
        "consumers",
        "batch",
        "connections",
    }
)


@dataclass(frozen=True)
class Measurement:
    bench: str
    case: str
    metric: str
    unit: str
    value: float
    run: int | None
    dims: tuple[tuple[str, str], ...] = ()
    run_id: str | None = None
    ceiling: str | None = None


@dataclass
class Row:
    """The summary of one (bench, case, dims, metric) across runs."""

    bench: str
    case: str
    metric: str
    unit: str
    dims: tuple[tuple[str, str], ...]
    values: list[float]
    run_ids: set[str | None] = field(default_factory=set)
    ceiling: str | None = None

    @property
    def median(self) -> float:
        return median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def runs(self) -> int:
        return len(self.values)

    def dim(self, key: str) -> str | None:
        return dict(self.dims).get(key)


@dataclass
class BenchResults:
    name: str
    measurements: list[Measurement] = field(default_factory=list)
    harness: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    machine_lines: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    # Whole-result lines some benches add for their own report section (see SECTION_KINDS).
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Reading


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dims(record: dict[str, Any], exclude: set[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for key, value in record.items():
        if key in VOLATILE_KEYS or key in RECORD_KEYS or key in exclude:
            continue
        if value is None or isinstance(value, dict | list):
            continue
        out.append((key, str(value)))
    return tuple(sorted(out))


def normalize(record: dict[str, Any], default_bench: str) -> list[Measurement]:
    """One JSON line → its measurements (none for machine/error/harness/summary lines).

    Conforming lines carry metric + value. Older lines that only carry named numbers
    (e.g. {"msg_per_s": 4100, "delivery_p99_ms": 31}) are read by field suffix, so a
    bench written before this protocol still shows up in the report.
    """
    kind = record.get("kind", "measurement")
    if kind != "measurement":
        return []
    bench = str(record.get("bench") or default_bench)
    if bench.endswith("_summary"):
        return []  # the report computes its own medians from the per-run lines
    run = record.get("run")
    run_n = int(run) if isinstance(run, int | float) and not isinstance(run, bool) else None
    run_id = record.get("run_id")
    ceiling = record.get("ceiling")
    ceiling_s = str(ceiling) if ceiling else None
    if "metric" in record and "value" in record:
        if not is_number(record["value"]):
            return []
        return [
            Measurement(
                bench=bench,
                case=str(record.get("case", "")),
                metric=str(record["metric"]),
                unit=str(record.get("unit", "")),
                value=float(record["value"]),
                run=run_n,
                dims=_dims(record, set()),
                run_id=run_id,
                ceiling=ceiling_s,
            )
        ]
    metric_fields: dict[str, str] = {}
    inputs: set[str] = set()
    for key, value in record.items():
        if not is_number(value) or key in VOLATILE_KEYS:
            continue
        if key in LEGACY_NUMERIC_DIMS or key.startswith(("rate_", "target_")):
            inputs.add(key)  # a configured rate is an input, not a result
            continue
        for suffix, unit in LEGACY_METRIC_SUFFIXES:
            if key.endswith(suffix):
                metric_fields[key] = unit
                break
    ignored = {k for k, v in record.items() if is_number(v) and k not in inputs}
    dims = _dims(record, ignored)
    # Legacy benches name their sub-measurement in `bench` (e.g. consume_drain): use it
    # as the case when the line has none.
    case = str(record.get("case") or (bench if bench != default_bench else ""))
    return [
        Measurement(
            bench=bench,
            case=case,
            metric=key,
            unit=unit if unit != "/s" else f"{key[: -len('_per_s')]}/s",
            value=float(record[key]),
            run=run_n,
            dims=dims,
            run_id=run_id,
            ceiling=ceiling_s,
        )
        for key, unit in metric_fields.items()
    ]


def parse_lines(name: str, lines: list[str]) -> BenchResults:
    results = BenchResults(name=name)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            results.bad_lines += 1
            continue
        if not isinstance(record, dict):
            results.bad_lines += 1
            continue
        kind = record.get("kind", "measurement")
        if kind == "harness":
            results.harness = record
        elif kind == "machine":
            results.machine_lines.append(record)
        elif kind == "error":
            results.errors.append(record)
        elif kind in SECTION_KINDS:
            results.sections.setdefault(kind, []).append(record)
        else:
            results.measurements.extend(normalize(record, name))
    return results


def load_results(results_dir: Path) -> tuple[dict[str, Any], list[BenchResults]]:
    machine: dict[str, Any] = {}
    machine_file = results_dir / "machine.json"
    if machine_file.exists():
        try:
            machine = json.loads(machine_file.read_text())
        except json.JSONDecodeError:
            machine = {}
    benches = [
        parse_lines(path.stem, path.read_text(errors="replace").splitlines())
        for path in sorted(results_dir.glob("*.jsonl"))
    ]
    return machine, benches


# ---------------------------------------------------------------------------------------
# Summaries


def summarize(measurements: list[Measurement]) -> list[Row]:
    groups: dict[tuple[Any, ...], Row] = {}
    for m in measurements:
        key = (m.bench, m.case, m.dims, m.metric, m.unit)
        row = groups.get(key)
        if row is None:
            row = groups[key] = Row(m.bench, m.case, m.metric, m.unit, m.dims, [], set())
        row.values.append(m.value)
        row.run_ids.add(m.run_id)
        if m.ceiling:
            row.ceiling = m.ceiling
    return list(groups.values())


def is_throughput(row: Row) -> bool:
    return row.unit.endswith("/s") and not row.unit.startswith("MiB")


def stage_of(row: Row) -> str | None:
    """produce / consume: from the row's `stage` field, else guessed from bench and case."""
    stage = row.dim("stage")
    if stage in CEILINGS_BY_STAGE:
        return stage
    text = f"{row.bench} {row.case}".lower()
    if "consum" in text:
        return "consume"
    if "produc" in text or "ingest" in text:
        return "produce"
    return None


@dataclass
class Ceiling:
    case: str
    value: float
    unit: str
    same_run: bool


def find_ceiling(row: Row, ceilings: list[Row], run_id: str | None) -> Ceiling | None:
    """The Kafka ceiling a throughput row is read against, preferring a matching record size."""
    if row.bench == CEILING_BENCH or not is_throughput(row):
        return None
    wanted: tuple[str, ...]
    if row.ceiling:
        wanted = (row.ceiling.split("/")[-1],)
    else:
        stage = stage_of(row)
        if stage is None:
            return None
        wanted = CEILINGS_BY_STAGE[stage]
    for case in wanted:
        candidates = [c for c in ceilings if c.case == case and c.metric == "throughput"]
        if not candidates:
            continue
        size = row.dim("record_size")
        matching = [c for c in candidates if size is not None and c.dim("record_size") == size]
        best = (matching or candidates)[0]
        same = run_id is not None and best.run_ids == {run_id} and row.run_ids == {run_id}
        return Ceiling(case, best.median, best.unit, same_run=same or run_id is None)
    return None


# ---------------------------------------------------------------------------------------
# Rendering

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
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, VOLATILE_KEYS, median
from bench.peer_tools import PUBLISHED_MSG_S, ratio

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


def _is_number(value: Any) -> bool:
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
        if not _is_number(record["value"]):
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
        if not _is_number(value) or key in VOLATILE_KEYS:
            continue
        if key in LEGACY_NUMERIC_DIMS or key.startswith(("rate_", "target_")):
            inputs.add(key)  # a configured rate is an input, not a result
            continue
        for suffix, unit in LEGACY_METRIC_SUFFIXES:
            if key.endswith(suffix):
                metric_fields[key] = unit
                break
    ignored = {k for k, v in record.items() if _is_number(v) and k not in inputs}
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


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _dims_text(row: Row, skip: set[str]) -> str:
    parts = [f"{k}={v}" for k, v in row.dims if k not in skip]
    return ", ".join(parts) or "-"


def _common_dims(rows: list[Row]) -> dict[str, str]:
    """Dimensions with one value across a bench: shown once above its table."""
    if not rows:
        return {}
    common = dict(rows[0].dims)
    for row in rows[1:]:
        d = dict(row.dims)
        common = {k: v for k, v in common.items() if d.get(k) == v}
    return common


def render_machine(machine: dict[str, Any], benches: list[BenchResults]) -> list[str]:
    facts = dict(machine.get("facts") or {})
    if not facts:
        for b in benches:
            if b.machine_lines:
                skip = {"kind", "ts", "bench", "run_id"}
                facts = {k: v for k, v in b.machine_lines[0].items() if k not in skip}
                break
    if not facts:
        return ["_No machine facts recorded._", ""]
    lines = ["| fact | value |", "|---|---|"]
    for key in sorted(facts):
        value = facts[key]
        if key.endswith("_bytes") and _is_number(value):
            value = f"{value / 2**30:.1f} GiB"
        lines.append(f"| {key} | {value} |")
    return [*lines, ""]


def render_harness(benches: list[BenchResults]) -> list[str]:
    lines = [
        "| bench | status | exit | elapsed s | load1 start→end | steal % | lines | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in benches:
        h = b.harness or {}
        status = h.get("status", "no harness record")
        load = f"{h.get('load1_start', '?')}→{h.get('load1_end', '?')}" if h else "-"
        lines.append(
            f"| {b.name} | {status} | {h.get('returncode', '-')} | {h.get('elapsed_s', '-')} "
            f"| {load} | {h.get('steal_pct', '-')} | {len(b.measurements)} "
            f"| {len(b.errors) + b.bad_lines} |"
        )
    return [*lines, ""]


def render_bench(
    bench: BenchResults, rows: list[Row], ceilings: list[Row], run_id: str | None
) -> list[str]:
    out = [f"## {bench.name}", ""]
    h = bench.harness or {}
    if h.get("status") not in (None, "ok"):
        tail = str(h.get("stderr_tail", "")).strip().splitlines()[-6:]
        out += [f"**{h.get('status')}** (exit {h.get('returncode')}).", ""]
        if tail:
            out += ["```", *tail, "```", ""]
    for err in bench.errors[:5]:
        out.append(
            f"- error in `{err.get('case', '?')}` run {err.get('run', '?')}: "
            f"{str(err.get('error', ''))[:200]}"
        )
    if bench.errors:
        out.append("")
    if not rows:
        return [*out, "_No measurements._", ""]
    common = _common_dims(rows)
    if common:
        out += ["Context: " + ", ".join(f"{k}={v}" for k, v in sorted(common.items())), ""]
    out += [
        "| case | context | metric | median | min | max | unit | runs | vs ceiling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r.case, r.dims, r.metric)):
        ceiling = find_ceiling(row, ceilings, run_id)
        versus = "-"
        if ceiling is not None and ceiling.value > 0:
            pct = 100.0 * row.median / ceiling.value
            versus = f"{pct:.0f}% of {ceiling.case} ({fmt(ceiling.value)} {ceiling.unit})"
            if not ceiling.same_run:
                versus += " [other run]"
        out.append(
            f"| {row.case or '-'} | {_dims_text(row, set(common))} | {row.metric} "
            f"| {fmt(row.median)} | {fmt(row.min)} | {fmt(row.max)} | {row.unit} "
            f"| {row.runs} | {versus} |"
        )
    return [*out, ""]


def _ms(value: Any) -> str:
    return fmt(float(value)) if _is_number(value) else "-"


def _top_groups(cpu: dict[str, Any], n: int = 3) -> str:
    items = sorted(
        ((g, float(v)) for g, v in (cpu or {}).items() if _is_number(v)), key=lambda kv: -kv[1]
    )
    return ", ".join(f"{g} {v:.0f}%" for g, v in items[:n]) or "-"


def render_profiles(records: list[dict[str, Any]]) -> list[str]:
    """The seed's load profiles: one row per profile (the latest run of each)."""
    if not records:
        return []
    latest: dict[str, tuple[dict[str, Any], Any]] = {}
    for rec in records:
        result = rec.get("result") or {}
        latest[str(result.get("profile", rec.get("case", "?")))] = (result, rec.get("load1", "-"))
    out = [
        "### Load profiles (seed section 8), end to end",
        "",
        "Latency = message created at the simulator → handler start, on the direct path; "
        "messages handled only when the DLQ retried them (rate-limited ones, by design a "
        "minute or more later) are counted apart. Audit against the "
        "simulator's ground truth after the load stops; dead letters by reason. CPU in % of "
        "one core (200 % = both cores), summed over the window.",
        "",
        "| profile | target msg/s | offered | processed | p50 ms | p99 ms | max ms "
        "| normal users p99 ms | handled via DLQ retry: n, max ms | mailboxes | Ray workers "
        "| RSS Ray / stack MiB "
        "| lost | reordered | dup. effects | dead letters | busiest (CPU) | load1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (r, load1) in latest.items():
        lat = (r.get("latency") or {}).get("all") or {}
        normal = (r.get("latency") or {}).get("normal") or {}
        audit = r.get("audit") or {}
        rss = r.get("rss_mib") or {}
        reasons = r.get("dead_letters_by_reason") or {}
        dead = ", ".join(f"{k} {v}" for k, v in reasons.items()) or "0"
        via = (r.get("latency") or {}).get("via_dlq") or {}
        via_text = f"{via.get('n', 0)}, {_ms(via.get('max_ms'))}" if via.get("n") else "0"
        normal_p99 = _ms(normal.get("p99_ms"))
        if r.get("normal_p99_without_attackers_ms") is not None:
            normal_p99 = (
                f"{normal_p99} (without attackers: {_ms(r['normal_p99_without_attackers_ms'])})"
            )
        out.append(
            f"| {name} | {_ms(r.get('target_msg_s'))} | {_ms(r.get('offered_msg_s'))} "
            f"| {_ms(r.get('processed_msg_s'))} | {_ms(lat.get('p50_ms'))} "
            f"| {_ms(lat.get('p99_ms'))} | {_ms(lat.get('max_ms'))} | {normal_p99} | {via_text} "
            f"| {r.get('mailboxes', '-')} | {r.get('ray_worker_processes', '-')} "
            f"| {_ms(rss.get('ray'))} / {_ms(rss.get('stack'))} | {audit.get('lost', '-')} "
            f"| {audit.get('reordered', '-')} | {audit.get('duplicated_side_effects', '-')} "
            f"| {dead} | {_top_groups(r.get('cpu_pct_by_group') or {})} | {load1} |"
        )
    return [*out, ""]


def render_stress(steps: list[dict[str, Any]], summaries: list[dict[str, Any]]) -> list[str]:
    """The stress curve (one row per step) and where and why it broke."""
    if not steps and not summaries:
        return []
    out = [
        "### Stress to breaking point",
        "",
        "Each step raises the offered load; a step breaks when p99 > 1 s (messages not "
        "handled yet count as slower), processed < 90 % of offered, consumer lag grows, or "
        "the simulator cannot offer the load; a step broken by latency alone is measured "
        "once more before it counts. `≥` marks a p99 that is only a lower bound. "
        "CPU total is this pipeline's processes only; load1 counts everything on the machine.",
        "",
        "| target msg/s | offered | processed | p50 ms | p99 ms | before Kafka start→end "
        "| consumer lag start→end | Redis cmds/s | CPU total % | busiest (CPU) | load1 "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in steps:
        r = rec.get("result") or {}
        p99 = _ms(r.get("p99_ms"))
        if r.get("p99_censored"):
            p99 = f"≥ {p99}"
        verdict = "; ".join(r.get("reasons") or []) if r.get("broke") else "ok"
        if r.get("retried"):
            verdict = f"{verdict} → measured again (latency only: a neighbour's burst?)"
        out.append(
            f"| {_ms(r.get('target_msg_s'))} | {_ms(r.get('offered_msg_s'))} "
            f"| {_ms(r.get('processed_msg_s'))} | {_ms(r.get('p50_ms'))} | {p99} "
            f"| {r.get('ingest_backlog_start', '-')}→{r.get('ingest_backlog_end', '-')} "
            f"| {r.get('lag_start', '-')}→{r.get('lag_end', '-')} "
            f"| {_ms(r.get('redis_cmds_s'))} | {_ms(r.get('cpu_total_pct'))} "
            f"| {_top_groups(r.get('cpu_pct_by_group') or {})} | {r.get('load1', '-')} "
            f"| {verdict} |"
        )
    out.append("")
    for rec in summaries[-1:]:
        r = rec.get("result") or {}
        audit = r.get("audit") or {}
        out.append(
            f"Highest load handled without breaking: **{_ms(r.get('max_ok_msg_s'))} msg/s** "
            f"({r.get('users', '?')} users, handler `{r.get('handler', '?')}`). Audit after "
            f"the climb: " + ", ".join(f"{k}={v}" for k, v in audit.items()) + "."
        )
        brk = r.get("breaking")
        if not brk:
            out += ["", f"_{r.get('note', 'No step broke.')}_", ""]
            continue
        out += [
            "",
            f"**Broke at {_ms(brk.get('target_msg_s'))} msg/s**: " + "; ".join(brk.get("why", [])),
            "",
        ]
        busiest = ", ".join(f"{g} {v}%" for g, v in brk.get("busiest_groups", []))
        if busiest:
            out += [f"Busiest process groups there: {busiest}.", ""]
        if brk.get("error"):
            out += [f"py-spy: {brk['error']}", ""]
        hottest = brk.get("hottest_process") or {}
        if hottest:
            out += [
                f"Busiest single process: pid {hottest.get('pid')} (`{hottest.get('group')}`).",
                "",
            ]
        for prof in brk.get("profiles") or []:
            if prof.get("error"):
                out += [f"py-spy of `{prof.get('group')}` failed: {prof['error']}", ""]
                continue
            path = Path(str(prof.get("path", "")))
            out += [
                f"py-spy of pid {prof.get('pid')} (`{prof.get('group')}`): "
                f"`results/{path.name}` (open in speedscope.app). Top functions by self "
                "time (threads blocked in C calls, e.g. a Ray worker's main loop or "
                "librdkafka's poll, can show up as busy):",
                "",
                "| function | file | self % |",
                "|---|---|---|",
            ]
            for fn in (prof.get("top") or [])[:12]:
                out.append(
                    f"| `{fn.get('function')}` | {Path(str(fn.get('file', ''))).name} "
                    f"| {fn.get('self_pct')} |"
                )
            out.append("")
    return out


@dataclass
class PeerComparison:
    """One peer case beside ours: same handler, same backlog, same total concurrency."""

    handler: str
    concurrency: int
    peer: Row
    ours: Row | None
    ratio: float | None  # ours / peer, medians of runs


def ours_concurrency(contexts: list[dict[str, Any]]) -> int | None:
    """Our hosted pipeline's total handler concurrency (hosts × per host) in that run."""
    for ctx in reversed(contexts):
        value = ctx.get("ours_concurrency")
        if _is_number(value):
            return int(value)
    return None


def peer_comparisons(
    all_rows: dict[str, list[Row]], contexts: list[dict[str, Any]]
) -> list[PeerComparison]:
    """Each peer throughput case of the consume scenario, with ours where ours exists.

    Ours exists where bench_consume ran the same handler (`hosted_<handler>`) and our total
    concurrency equals the peer's; any other peer case stands alone (ratio None).
    """
    ours_total = ours_concurrency(contexts)
    ours_by_handler = {
        r.case.removeprefix("hosted_"): r
        for r in all_rows.get(OURS_BENCH, [])
        if r.case.startswith("hosted_") and r.metric == "throughput" and is_throughput(r)
    }
    out = []
    for row in all_rows.get(PEER_BENCH, []):
        if row.metric != "throughput" or row.dim("scenario") != "consume":
            continue
        handler = row.dim("handler") or "?"
        try:
            concurrency = int(row.dim("concurrency") or "0")
        except ValueError:
            concurrency = 0
        ours = ours_by_handler.get(handler) if concurrency == ours_total else None
        out.append(
            PeerComparison(
                handler=handler,
                concurrency=concurrency,
                peer=row,
                ours=ours,
                ratio=ratio(ours.median if ours else None, row.median),
            )
        )
    return sorted(out, key=lambda c: (c.handler, c.concurrency))


def render_peer(all_rows: dict[str, list[Row]], contexts: list[dict[str, Any]]) -> list[str]:
    """Ours vs Confluent Parallel Consumer, per case, and its published scenario."""
    comparisons = peer_comparisons(all_rows, contexts)
    published = [
        r
        for r in all_rows.get(PEER_BENCH, [])
        if r.metric == "throughput" and r.dim("scenario") == "published"
    ]
    if not comparisons and not published:
        return []
    ctx = contexts[-1] if contexts else {}
    ours_total = ours_concurrency(contexts)
    out = [
        "### Ours vs Confluent Parallel Consumer (the peer), same broker, same backlog",
        "",
        f"Parallel Consumer {ctx.get('parallel_consumer_version', '?')} (kafka-clients "
        f"{ctx.get('kafka_clients_version', '?')}), ProcessingOrder.{ctx.get('ordering', 'KEY')}, "
        f"commit mode {ctx.get('commit_mode', '?')}, one warm JVM; ours: the `consume` "
        f"bench's hosted drains, {ctx.get('ours_num_hosts', '?')} hosts × "
        f"{ctx.get('ours_handler_concurrency', '?')} handlers per host = {ours_total or '?'} "
        "at once (`consume.num_hosts` × `consume.handler_concurrency`). A ratio is shown "
        "where the total concurrency is the same; ours also writes a durable done-flag per "
        "message and consults the rate limiter per batch, the peer does neither.",
        "",
        "| handler | concurrency | peer msg/s median (min–max) | ours msg/s median (min–max) "
        "| ours / peer | runs (peer/ours) |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        ours_text = (
            f"{fmt(c.ours.median)} ({fmt(c.ours.min)}–{fmt(c.ours.max)})"
            if c.ours
            else f"- (ours runs {ours_total or '?'})"
            if c.concurrency != ours_total
            else "- (no `consume` hosted drain in these results)"
        )
        ratio_text = f"**{c.ratio:.2f}×**" if c.ratio is not None else "-"
        if c.ours is not None and c.ours.run_ids != c.peer.run_ids:
            ratio_text += " [other run]"  # not the same harness run: machine state differs
        out.append(
            f"| {c.handler} | {c.concurrency} "
            f"| {fmt(c.peer.median)} ({fmt(c.peer.min)}–{fmt(c.peer.max)}) | {ours_text} "
            f"| {ratio_text} | {c.peer.runs}/{c.ours.runs if c.ours else 0} |"
        )
    for row in published:
        share = 100.0 * row.median / PUBLISHED_MSG_S
        out += [
            "",
            f"Its published scenario (README: 10,000 messages on 10,000 keys, 1 partition, "
            f"0–5 ms random work, max concurrency 100, 2.128 s ≈ {fmt(PUBLISHED_MSG_S)} msg/s): "
            f"**{fmt(row.median)} msg/s** here ({fmt(row.min)}–{fmt(row.max)}, {row.runs} "
            f"runs), {share:.0f}% of the published figure.",
        ]
    return [*out, ""]


def render_report(
    machine: dict[str, Any],
    benches: list[BenchResults],
    charts: list[Path] | None = None,
    base_dir: Path | None = None,
) -> str:
    """The whole REPORT.md text; chart links are relative to base_dir (the report's folder)."""
    run_id = machine.get("run_id")
    all_rows = {b.name: summarize(b.measurements) for b in benches}
    ceilings = [r for rows in all_rows.values() for r in rows if r.bench == CEILING_BENCH]
    mode = machine.get("mode", "?")
    out = [
        "# qywx-ray benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from "
        f"`bench/results/` (run `{run_id or 'unknown'}`, mode {mode}). Figures are medians "
        "of the repeated runs with their min and max: the vCPUs here are slow and the "
        "hypervisor steals time, so a single run means little. Throughput is read against "
        "the Kafka ceiling (`kafka_ceiling`: raw confluent-kafka loop, else Kafka's perf "
        "tools) measured in the same harness run.",
        "",
        "## Machine",
        "",
        *render_machine(machine, benches),
        "## Harness",
        "",
        *render_harness(benches),
    ]
    order = sorted(benches, key=lambda b: (b.name != CEILING_BENCH, b.name))
    for bench in order:
        out += render_bench(bench, all_rows[bench.name], ceilings, run_id)
        out += render_profiles(bench.sections.get("profile", []))
        out += render_stress(
            bench.sections.get("stress_step", []), bench.sections.get("stress_summary", [])
        )
        if bench.name == PEER_BENCH:
            out += render_peer(all_rows, bench.sections.get("peer_context", []))
    if charts:
        out += ["## Charts", ""]
        for chart in charts:
            rel = os.path.relpath(chart, base_dir or ROOT / "bench")
            out.append(f"![{chart.stem}]({rel})")
        out.append("")
    else:
        out += [
            "_Charts: install the `bench` extra (matplotlib) and re-run `python "
            "bench/report.py` to add PNG charts._",
            "",
        ]
    return "\n".join(out)


def write_charts(benches: list[BenchResults], results_dir: Path) -> list[Path]:
    """Throughput and latency bars per bench (median, min–max whiskers); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    for bench in benches:
        rows = summarize(bench.measurements)
        common = _common_dims(rows)
        for kind, select in (
            ("throughput", is_throughput),
            ("latency", lambda r: r.unit == "ms"),
        ):
            chosen = sorted((r for r in rows if select(r)), key=lambda r: (r.case, r.dims))
            if not chosen:
                continue
            labels = [
                " ".join(x for x in (r.case, r.metric, _dims_text(r, set(common))) if x != "-")
                for r in chosen
            ]
            medians = [r.median for r in chosen]
            lower = [r.median - r.min for r in chosen]
            upper = [r.max - r.median for r in chosen]
            fig, ax = plt.subplots(figsize=(9, 0.45 * len(chosen) + 1.5))
            ax.barh(range(len(chosen)), medians, xerr=[lower, upper], capsize=3)
            ax.set_yticks(range(len(chosen)), labels, fontsize=7)
            units = sorted({r.unit for r in chosen})
            ax.set_xlabel(f"median ({', '.join(units)}), whiskers min–max")
            ax.set_title(f"{bench.name}: {kind}")
            fig.tight_layout()
            path = results_dir / f"{bench.name}_{kind}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        curve = stress_curve(bench.sections.get("stress_step", []))
        if curve:
            fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
            xs = [c[0] for c in curve]
            top.plot(xs, [c[1] for c in curve], marker="o", label="offered")
            top.plot(xs, [c[2] for c in curve], marker="o", label="processed")
            top.set_ylabel("msg/s")
            top.legend()
            bottom.plot(xs, [c[3] for c in curve], marker="o", label="p50")
            bottom.plot(xs, [c[4] for c in curve], marker="o", label="p99")
            bottom.axhline(1000, linestyle="--", linewidth=1, label="1 s limit")
            bottom.set_ylabel("ms (creation → handler)")
            bottom.set_xlabel("target msg/s")
            bottom.legend()
            for ax in (top, bottom):
                ax.set_xscale("log")
            fig.suptitle(f"{bench.name}: stress curve")
            fig.tight_layout()
            path = results_dir / f"{bench.name}_curve.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_peer_chart(benches: list[BenchResults], results_dir: Path) -> list[Path]:
    """Ours vs the peer per case (median bars, min–max whiskers); [] without data/matplotlib."""
    all_rows = {b.name: summarize(b.measurements) for b in benches}
    peer = next((b for b in benches if b.name == PEER_BENCH), None)
    comparisons = peer_comparisons(all_rows, peer.sections.get("peer_context", []) if peer else [])
    if not comparisons:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    labels = [f"{c.handler}, concurrency {c.concurrency}" for c in comparisons]
    fig, ax = plt.subplots(figsize=(8, 0.8 * len(comparisons) + 1.5))
    height = 0.38
    for offset, name, rows in (
        (-height / 2, "Parallel Consumer", [c.peer for c in comparisons]),
        (height / 2, "ours (hosted)", [c.ours for c in comparisons]),
    ):
        ys = [i + offset for i, r in enumerate(rows) if r is not None]
        present = [r for r in rows if r is not None]
        if not present:
            continue
        ax.barh(
            ys,
            [r.median for r in present],
            height=height,
            xerr=[[r.median - r.min for r in present], [r.max - r.median for r in present]],
            capsize=3,
            label=name,
        )
    ax.set_yticks(range(len(comparisons)), labels, fontsize=8)
    ax.set_xlabel("msg/s, median of runs (whiskers min–max)")
    ax.set_title("consume drain: ours vs Confluent Parallel Consumer (KEY order)")
    ax.legend()
    fig.tight_layout()
    path = results_dir / "peer_vs_ours_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def stress_curve(steps: list[dict[str, Any]]) -> list[tuple[float, float, float, float, float]]:
    """(target, offered, processed, p50, p99) per stress step, for the curve chart."""
    out = []
    for rec in steps:
        r = rec.get("result") or {}
        if r.get("retried"):
            continue  # the step's second measurement is the one that counts
        keys = ("target_msg_s", "offered_msg_s", "processed_msg_s", "p50_ms", "p99_ms")
        if all(_is_number(r.get(k)) for k in keys):
            out.append(tuple(float(r[k]) for k in keys))
    return sorted(out)  # type: ignore[arg-type]


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

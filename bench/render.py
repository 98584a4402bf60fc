"""REPORT.md as text: machine facts, harness status, one table per bench with each
throughput beside its ceiling, profiles, the stress curve and the peer comparison."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peer_tools import PUBLISHED_MSG_S, ratio
from bench.results import (
    CEILING_BENCH,
    OURS_BENCH,
    PEER_BENCH,
    BenchResults,
    Row,
    find_ceiling,
    is_number,
    is_throughput,
    summarize,
)
from bench.runs import ROOT


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


def dims_text(row: Row, skip: set[str]) -> str:
    parts = [f"{k}={v}" for k, v in row.dims if k not in skip]
    return ", ".join(parts) or "-"


def common_dims(rows: list[Row]) -> dict[str, str]:
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
        if key.endswith("_bytes") and is_number(value):
            value = f"{value / 2**30:.1f} GiB"
        lines.append(f"| {key} | {value} |")
    return [*lines, ""]


def bench_runs(bench: BenchResults) -> str:
    """Which harness run(s) a bench's figures come from: `make bench` rewrites only the
    benches it ran, and a bench run on its own has no run id."""
    ids = {m.run_id for m in bench.measurements}
    if bench.harness is not None and bench.harness.get("run_id"):
        ids.add(bench.harness["run_id"])
    named = [f"`{i}`" for i in sorted(i for i in ids if i)]
    if None in ids and bench.measurements:
        named.append("outside the harness")
    return ", ".join(named) or "-"


def render_harness(benches: list[BenchResults]) -> list[str]:
    lines = [
        "| bench | run | status | exit | elapsed s | load1 start→end | steal % | lines | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in benches:
        h = b.harness or {}
        status = h.get("status", "no harness record")
        load = f"{h.get('load1_start', '?')}→{h.get('load1_end', '?')}" if h else "-"
        lines.append(
            f"| {b.name} | {bench_runs(b)} | {status} | {h.get('returncode', '-')} "
            f"| {h.get('elapsed_s', '-')} | {load} | {h.get('steal_pct', '-')} "
            f"| {len(b.measurements)} | {len(b.errors) + b.bad_lines} |"
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
    common = common_dims(rows)
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
            f"| {row.case or '-'} | {dims_text(row, set(common))} | {row.metric} "
            f"| {fmt(row.median)} | {fmt(row.min)} | {fmt(row.max)} | {row.unit} "
            f"| {row.runs} | {versus} |"
        )
    return [*out, ""]


def _ms(value: Any) -> str:
    return fmt(float(value)) if is_number(value) else "-"


def _top_groups(cpu: dict[str, Any], n: int = 3) -> str:
    items = sorted(
        ((g, float(v)) for g, v in (cpu or {}).items() if is_number(v)), key=lambda kv: -kv[1]
    )
    return ", ".join(f"{g} {v:.0f}%" for g, v in items[:n]) or "-"


def render_profiles(records: list[dict[str, Any]]) -> list[str]:
    """The original design's load profiles: one row per profile (the latest run of each)."""
    if not records:
        return []
    latest: dict[str, tuple[dict[str, Any], Any]] = {}
    for rec in records:
        result = rec.get("result") or {}
        latest[str(result.get("profile", rec.get("case", "?")))] = (result, rec.get("load1", "-"))
    out = [
        "### Load profiles (the original design's), end to end",
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


_AOF_REWRITE_NOTES = {
    "between-steps": "the bench rewrites the file before each ladder step and after each "
    "drain, and waits for it; Redis's "
    "own rewrites are off, so none runs inside a measured window. On these 2 cores a rewrite "
    "that lands in a window competes with the pipeline: see bench/bench_stress.py",
    "redis": "Redis's own policy: a rewrite can land inside a window",
    "off": "never rewritten (an experiment)",
}


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
        "once more before it counts. After the first break, the load between the last step "
        "that held and the one that broke is bisected (`--refine`, each try from a drained "
        "pipeline). `≥` marks a p99 that is only a lower bound. "
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
        if r.get("refined"):
            verdict = f"bisecting, after a drain: {verdict}"
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
        rewrite = r.get("aof_rewrite")
        if rewrite:
            out.append(f"Redis AOF rewrites: `{rewrite}` ({_AOF_REWRITE_NOTES.get(rewrite, '')}).")
        ref = r.get("refined") or {}
        if ref.get("stopped") and not ref.get("tried"):
            out.append(f"Bisection stopped before its first try: {ref['stopped']}.")
        elif ref.get("tried"):
            out.append(
                f"Bisected after the first break ({', '.join(_ms(t) for t in ref['tried'])} "
                f"msg/s): held at **{_ms(ref.get('held_msg_s'))}**, broke at "
                f"{_ms(ref.get('broke_msg_s'))} msg/s"
                + (f" (stopped: {ref['stopped']})." if ref.get("stopped") else ".")
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
        if is_number(value):
            return int(value)
    return None


def peer_comparisons(
    all_rows: dict[str, list[Row]], contexts: list[dict[str, Any]]
) -> list[PeerComparison]:
    """Each peer throughput case of the consume scenario, with ours where ours exists.

    Ours exists where bench_consume ran the same handler at the same total concurrency:
    its rows' `handler` and `concurrency` dimensions (a row without `concurrency`, from
    before it was recorded, ran at the hosted pipeline's own total). Where two drains claim
    the same pair, the hosted run's own (`hosted_<handler>`) is kept.
    """
    ours_total = ours_concurrency(contexts)
    ours_by_case: dict[tuple[str, int | None], Row] = {}
    for r in all_rows.get(OURS_BENCH, []):
        if not (r.case.startswith("hosted_") and r.metric == "throughput" and is_throughput(r)):
            continue
        handler = r.dim("handler")
        if handler is None or r.dim("state_bytes") is not None or r.dim("warmup"):
            continue  # not a plain drain (per-user state on/off) or not a result (warm-up)
        conc = r.dim("concurrency")
        key = (handler, int(conc) if conc and conc.isdigit() else ours_total)
        if key not in ours_by_case or r.case == f"hosted_{handler}":
            ours_by_case[key] = r
    out = []
    for row in all_rows.get(PEER_BENCH, []):
        if row.metric != "throughput" or row.dim("scenario") != "consume":
            continue
        handler = row.dim("handler") or "?"
        try:
            concurrency = int(row.dim("concurrency") or "0")
        except ValueError:
            concurrency = 0
        ours = ours_by_case.get((handler, concurrency))
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
        "at once (`consume.num_hosts` × `consume.handler_concurrency`), and its `concurrency` "
        "mode's drains at the peer's other concurrency. A "
        "ratio is shown where the total concurrency is the same; ours also writes a durable "
        "done-flag per message and consults the rate limiter per batch, the peer does "
        "neither.",
        "",
        "| handler | concurrency | peer msg/s median (min–max) | ours msg/s median (min–max) "
        "| ours / peer | runs (peer/ours) |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        ours_text = (
            f"{fmt(c.ours.median)} ({fmt(c.ours.min)}–{fmt(c.ours.max)})"
            if c.ours
            else "- (no `consume` hosted drain in these results)"
            if c.concurrency == ours_total
            else f"- (ours runs {ours_total or '?'}; `bench_consume --only concurrency "
            f"--peer-concurrency {c.concurrency}` adds it)"
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
        f"`bench/results/` (machine facts from run `{run_id or 'unknown'}`, mode {mode}; "
        "each bench's run is in the Harness table: `make bench` rewrites only what it ran). "
        "Figures are medians "
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

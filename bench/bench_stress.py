"""Stress to breaking point: raise the offered load stepwise until latency or backlog breaks.

One LocalPipeline (simulator population → callbacks → sync → Kafka → consumers → hosted
user mailboxes → a trivial stamping handler, protection off) runs for the whole bench;
each step sets the population's rate (×2 per step from 500 msg/s by default), lets it
settle, then measures a window: offered vs processed msg/s, latency p50/p99 (creation at
the simulator → handler start; messages still unprocessed count as slower than the
window), consumer lag growth, Redis commands/s and CPU per process group. The first step
that breaks (p99 > 1 s, processed < 90 % of offered, lag growing, or the simulator unable
to offer the load) ends the climb: py-spy records the busiest Python process there, its
top functions go into the result. Then `--refine` rounds (2) bisect the gap between the
last step that held and the one that broke (8,000 / 16,000 → 12,000 → 10,000 or 14,000),
each from a drained pipeline, so the report says how close one account comes to a target
between two ×2 steps. A final audit checks every message was handled once, in per-user
order. Never touches the shared development services (see bench_profiles).

  python -m bench.bench_stress [--quick] [--start-msg-s 500] [--factor 2] [--max-steps 6]
                               [--refine 2]
"""

# bench-timeout-s: full=1800 quick=900

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redis import exceptions as redis_errors

from bench.bench_profiles import (
    NOOP_STAMPED_HANDLER,
    STAMPED_HANDLER,
    Stack,
    audit_stamps,
    bench_stack,
    dead_letter_reasons,
    group_offsets,
    measure_window,
    offsets_client,
    pipeline_overrides,
    rss_split,
    running_pipeline,
    sim_mark,
    sim_post,
    wait_first_stamps,
    window_stats,
)
from bench.output import emit, log
from bench.procs import hottest_pid
from bench.pyspy import py_spy_record
from bench.runs import QUICK_ENV, RESULTS_DIR, quick_mode

if TYPE_CHECKING:
    from qywx_ray.devstack.pipeline import LocalPipeline, Stamp

P99_LIMIT_MS = 1000.0
# When the bench Redis rewrites its append-only file. "redis": Redis's own policy (when
# the file has doubled), so a rewrite can land inside a window. Its forked child copies
# every stamp and done-flag the run has left behind (~0.7 GiB by the bisections of the
# default ladder): there it took 5.9 s of CPU on the two cores the whole pipeline
# shares, the rate into Kafka fell to a median 5,900 msg/s of the 10,000 offered for the
# ~12 s it ran, and the window broke (bench/results/compare/README.md, "AOF rewrite").
# A production Redis runs apart, where a rewrite costs the pipeline the fork's pause
# (which grows with the dataset). "between-steps" (default): the bench rewrites the file
# itself before each ladder step (the load runs on at the previous rate) and after each
# drain (the pipeline idle), and waits for it, so the file stays bounded and no rewrite
# competes inside a measured window. "off": never (an experiment).
AOF_REWRITE_MODES = ("between-steps", "redis", "off")
AOF_REWRITE_TIMEOUT_S = 300.0
PROCESSED_MIN_RATIO = 0.9
OFFERED_MIN_RATIO = 0.8
LAG_GROWTH_MAX_RATIO = 0.05  # of the messages offered in the window


# ---------------------------------------------------------------------------------------
# Pure


def step_rates(start_msg_s: float, factor: float, max_steps: int) -> list[float]:
    """The offered load of each step: start, start×factor, ... (max_steps of them)."""
    if start_msg_s <= 0 or factor <= 1 or max_steps < 1:
        raise ValueError("need start_msg_s > 0, factor > 1, max_steps >= 1")
    return [start_msg_s * factor**i for i in range(max_steps)]


def refine_rate(ok_msg_s: float | None, broke_msg_s: float, grain: float = 100.0) -> float | None:
    """The next load to try between the highest step that held and the lowest that broke
    (bisection, rounded to `grain`), or None when nothing lies between at that grain or
    no step held. A ×2 ladder alone says "broke at 16,000, held 8,000": bisecting the
    gap says how close the pipeline comes to a target like 10,000."""
    if ok_msg_s is None or broke_msg_s - ok_msg_s <= grain:
        return None
    mid = round((ok_msg_s + broke_msg_s) / 2 / grain) * grain
    return mid if ok_msg_s < mid < broke_msg_s else None


def censored_percentile(
    latencies_ms: Sequence[float], missing: int, missing_at_least_ms: float, q: float = 99
) -> tuple[float | None, bool]:
    """Nearest-rank percentile over handled + `missing` messages, where a missing one
    (offered in the window, not handled yet) is known only to be `missing_at_least_ms`
    or slower.

    → (value, censored): censored means the rank falls where handled and missing ones
    mix, and the value is only a lower bound."""
    missing = max(0, missing)
    n = len(latencies_ms) + missing
    if n == 0:
        return None, False
    rank = max(1, math.ceil(q / 100.0 * n))
    ordered = sorted(latencies_ms)
    if missing == 0:
        return ordered[rank - 1], False
    below = [v for v in ordered if v < missing_at_least_ms]
    if rank <= len(below):
        return below[rank - 1], False
    return missing_at_least_ms, True


@dataclass
class Verdict:
    broke: bool
    reasons: list[str]


def step_verdict(
    target_msg_s: float,
    offered_msg_s: float,
    processed_msg_s: float,
    p99_ms: float | None,
    offered_in_window: int,
    lag_growth: int,
    ingest_backlog_growth: int = 0,
) -> Verdict:
    """Whether a step broke the pipeline (or the load generator), why, and where the
    backlog built up: before Kafka (ingest) or after it (consume)."""
    reasons = []
    if offered_msg_s < OFFERED_MIN_RATIO * target_msg_s:
        reasons.append(
            f"simulator offered {offered_msg_s:.0f} of {target_msg_s:.0f} msg/s "
            "(the load generator saturated)"
        )
    if p99_ms is None or p99_ms > P99_LIMIT_MS:
        reasons.append(f"p99 {p99_ms if p99_ms is not None else 'n/a'} ms > {P99_LIMIT_MS:.0f} ms")
    if processed_msg_s < PROCESSED_MIN_RATIO * offered_msg_s:
        reasons.append(
            f"processed {processed_msg_s:.0f} < 90% of offered {offered_msg_s:.0f} msg/s"
        )
    limit = LAG_GROWTH_MAX_RATIO * max(1, offered_in_window)
    if ingest_backlog_growth > limit:
        reasons.append(
            f"ingest behind: {ingest_backlog_growth} more messages waiting before Kafka "
            "(callback → sync → produce)"
        )
    if lag_growth > limit:
        reasons.append(
            f"consume behind: consumer lag grew by {lag_growth} (Kafka → consumers → hosts)"
        )
    return Verdict(bool(reasons), reasons)


def retry_step(reasons: Sequence[str], attempt: int) -> bool:
    """Measure a step again? Only once, and only when latency alone broke it (p99 over the
    limit with throughput and backlogs fine): that is what another tenant's CPU burst
    looks like here, while a real saturation also shows in throughput or backlog."""
    return attempt == 0 and bool(reasons) and all(r.startswith("p99") for r in reasons)


# ---------------------------------------------------------------------------------------
# Glue


def redis_commands(p: LocalPipeline) -> int:
    return int(p.redis_client().info("stats")["total_commands_processed"])


def rewrite_aof(
    p: LocalPipeline, timeout_s: float = AOF_REWRITE_TIMEOUT_S, poll_s: float = 0.2
) -> dict[str, Any]:
    """BGREWRITEAOF on the pipeline's Redis, then wait (bounded) until no rewrite runs.
    A rewrite already running (Redis refuses a second one) is waited for instead. Returns
    what happened, for the next step's row: seconds waited, Redis's status of its last
    rewrite ("ok" / "err"), or "timeout" (the step then starts anyway)."""
    client = p.redis_client()
    started = time.monotonic()
    try:
        client.bgrewriteaof()
    except redis_errors.ResponseError as exc:  # "... already in progress": wait for that one
        log(f"bench: AOF rewrite not started ({exc}); waiting for the running one")
    status = "timeout"
    while time.monotonic() - started < timeout_s:
        info = client.info("persistence")
        if not int(info.get("aof_rewrite_in_progress", 0)) + int(
            info.get("aof_rewrite_scheduled", 0)
        ):
            status = str(info.get("aof_last_bgrewrite_status", "?"))
            break
        time.sleep(poll_s)  # polling Redis's own flag: there is nothing to wait on
    waited_s = round(time.monotonic() - started, 1)
    log(f"bench: AOF rewrite before the step: {status} after {waited_s} s")
    return {"status": status, "waited_s": waited_s}


class StampReader:
    """Reads the handler stamps incrementally (the list only grows)."""

    def __init__(self, p: LocalPipeline) -> None:
        self.p = p
        self.stamps: list[Stamp] = []

    def refresh(self) -> list[Stamp]:
        from qywx_ray.devstack.pipeline import read_stamps

        self.stamps += read_stamps(self.p.redis_client(), start=len(self.stamps))
        return self.stamps


def wait_all_stamped(
    p: LocalPipeline, reader: StampReader, expected: int, stall_timeout_s: float
) -> bool:
    """Wait for the backlog of the breaking step to drain: give up only when nothing moved
    for `stall_timeout_s` (a backlog of 500,000 can take minutes) or after 10 minutes."""
    deadline = time.monotonic() + 600.0
    done, moved_at = -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - moved_at < stall_timeout_s:
        handled = {s.message_id for s in reader.refresh()}
        dead = {k.decode() for k in p.redis_client().hkeys("qywx:dlq:letters")}
        accounted = len(handled | dead)
        if accounted >= expected and p.lag() == 0:
            return True
        if accounted > done:
            done, moved_at = accounted, time.monotonic()
        time.sleep(1.0)
    return False


def refine_between(
    held: float | None,
    broke: float,
    rounds: int,
    step: Callable[[int, float, bool], tuple[dict[str, Any], Any]],
    drain: Callable[[], bool],
    resume_at: Callable[[float], None],
) -> dict[str, Any] | None:
    """Bisect between the highest step that held and the one that broke, `rounds` times.
    Each try starts from an empty pipeline (the broken step's backlog drained first, then
    the population resumed at the new rate), so it measures that load, not the catch-up.
    A backlog that does not drain ends the bisection (`stopped`)."""
    if rounds <= 0:
        return None
    out: dict[str, Any] = {"tried": []}
    for k in range(rounds):
        rate = refine_rate(held, broke)
        if rate is None:
            break
        if not drain():
            log("bench: stress refinement stopped: the backlog did not drain")
            out["stopped"] = "not drained"
            break
        resume_at(rate)
        row, _ = step(100 + k, rate, True)
        out["tried"].append(rate)
        if row["broke"]:
            broke = rate
        else:
            held = rate
    return {"held_msg_s": held, "broke_msg_s": broke, **out}


class StepTrace:
    """Once a second from the rate change to the window's end: messages created at the
    simulator, in Kafka, and committed by the consumers (cumulative), and whether Redis
    is rewriting its AOF. The transient of a step, which the window's totals average away.
    One Kafka client for the whole trace (a client per sample would cost more than the
    sample); a failed sample is skipped, never the step."""

    def __init__(self, p: LocalPipeline, every_s: float = 1.0) -> None:
        self.p = p
        self.every_s = every_s
        # [seconds since the start, created, in Kafka, committed, rewriting]
        self.rows: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-trace", daemon=True)

    def __enter__(self) -> StepTrace:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        # A sample still in flight (a slow answer) must not change the emitted row later.
        self.rows = list(self.rows)

    def _run(self) -> None:
        consumer = None
        t0 = time.monotonic()
        try:
            consumer, tps = offsets_client(self.p)
            redis = self.p.redis_client()
            while not self._stop.is_set():
                try:
                    created = sim_mark(self.p)["messages"]
                    end, done = group_offsets(consumer, tps, timeout_s=2.0)
                    rewriting = int(redis.info("persistence").get("aof_rewrite_in_progress", 0))
                    at = round(time.monotonic() - t0, 1)
                    self.rows.append([at, created, end, done, rewriting])
                except Exception as exc:  # a missed sample, not a failed step
                    log(f"bench: trace sample skipped: {exc}")
                self._stop.wait(self.every_s)
        except Exception as exc:  # no trace, never a failed step
            log(f"bench: trace stopped: {exc}")
        finally:
            if consumer is not None:
                consumer.close()


def run_step(
    p: LocalPipeline,
    stack: Stack,
    reader: StampReader,
    target_msg_s: float,
    users: int,
    settle_s: float,
    step_s: float,
    grace_s: float,
    trace: bool = False,
) -> tuple[dict[str, Any], Any]:
    tracer = StepTrace(p) if trace else None
    with tracer or contextlib.nullcontext():
        sim_post(p, "/sim/population/rates", {"rate_per_min": target_msg_s * 60.0 / users})
        time.sleep(settle_s)  # the new rate reaches steady state before the window opens
        redis0 = redis_commands(p)
        w = measure_window(p, stack, step_s)
        redis1 = redis_commands(p)
    time.sleep(grace_s)  # messages created at the window's end get their chance
    evaluated_ms = int(time.time() * 1000)
    ws = window_stats(reader.refresh(), w.t0_ms, w.t1_ms)
    latencies = [
        float(max(0, s.start_ms - s.created_ms))
        for s in _first_stamps(reader.stamps)
        if w.t0_ms <= s.created_ms < w.t1_ms
    ]
    missing = max(0, w.offered - len(latencies))
    lower_bound_ms = float(evaluated_ms - w.t1_ms)
    p50, _ = censored_percentile(latencies, missing, lower_bound_ms, 50)
    p99, censored = censored_percentile(latencies, missing, lower_bound_ms, 99)
    lat = ws.latency["all"]
    verdict = step_verdict(
        target_msg_s,
        w.offered_msg_s,
        ws.processed_msg_s,
        p99,
        w.offered,
        w.lag_end - w.lag_start,
        w.ingest_backlog_end - w.ingest_backlog_start,
    )
    row = {
        "target_msg_s": round(target_msg_s, 1),
        "offered_msg_s": round(w.offered_msg_s, 1),
        "processed_msg_s": round(ws.processed_msg_s, 1),
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_censored": censored,
        "max_ms": lat.max_ms,
        "unhandled_from_window": missing,
        "lag_start": w.lag_start,
        "lag_end": w.lag_end,
        "ingest_backlog_start": w.ingest_backlog_start,
        "ingest_backlog_end": w.ingest_backlog_end,
        "redis_cmds_s": round((redis1 - redis0) / w.duration_s, 1),
        "cpu_pct_by_group": w.cpu,
        "cpu_total_pct": round(sum(w.cpu.values()), 1),
        "gc_by_group": w.gc,
        "redis_bg": w.redis_bg,
        "rss_mib": rss_split(w.rss),
        "mailboxes": w.hosts["mailboxes"],
        "host_pending": w.hosts["pending"],
        "duration_s": round(w.duration_s, 1),
        "load1": round(os.getloadavg()[0], 2),
        "broke": verdict.broke,
        "reasons": verdict.reasons,
    }
    if tracer is not None:
        row["trace"] = tracer.rows
    return row, w


def emit_step(row: dict[str, Any]) -> None:
    case = "step_refined" if row.get("refined") else "step"
    dims = {
        "bench": "stress",
        "case": f"{case}_remeasured" if row["retried"] else case,
        "run": 0,
        "target_msg_s": row["target_msg_s"],
    }
    emit(**dims, metric="offered", value=row["offered_msg_s"], unit="msg/s")
    emit(**dims, metric="processed", value=row["processed_msg_s"], unit="msg/s")
    for key in ("p50_ms", "p99_ms"):
        if row[key] is not None:
            emit(**dims, metric=f"latency_{key[:-3]}", value=row[key], unit="ms")
    emit(kind="stress_step", bench="stress", case="step", run=0, result=row)


def _first_stamps(stamps: Sequence[Stamp]) -> list[Stamp]:
    seen: set[str] = set()
    out = []
    for s in stamps:
        if s.message_id not in seen and s.created_ms >= 0:
            seen.add(s.message_id)
            out.append(s)
    return out


PY_SKIP = frozenset({"kafka", "redis", "ray_gcs", "ray_raylet", "bench_driver", "other"})


def profile_targets(
    cpu_by_group: dict[str, float], busiest_by_group: dict[str, tuple[int, int]]
) -> list[tuple[int, str]]:
    """What to py-spy: the busiest process of the busiest Python group (the hottest
    component), then the single busiest Python process if it lives in another group (a
    serial bottleneck hides in one process). → [(pid, group)], at most two."""
    groups = [g for g, _ in sorted(cpu_by_group.items(), key=lambda kv: -kv[1])]
    python_groups = [g for g in groups if g not in PY_SKIP and g in busiest_by_group]
    if not python_groups:
        return []
    out = [(busiest_by_group[python_groups[0]][0], python_groups[0])]
    single = max(python_groups, key=lambda g: busiest_by_group[g][1])
    if single != python_groups[0]:
        out.append((busiest_by_group[single][0], single))
    return out


def busiest_by_group(w: Any) -> dict[str, tuple[int, int]]:
    """group → (pid, ticks) of its busiest process in the window."""
    start = {s.pid: s.cpu_ticks for s in w.scan_before}
    out: dict[str, tuple[int, int]] = {}
    for s in w.scan_after:
        if s.pid not in start:
            continue
        group = w.groups.get(s.pid, "other")
        delta = s.cpu_ticks - start[s.pid]
        if group not in out or delta > out[group][1]:
            out[group] = (s.pid, delta)
    return out


def profile_hottest(w: Any, duration_s: int, results_dir: Path) -> dict[str, Any]:
    """py-spy the hottest component (and the hottest single process, if elsewhere)."""
    overall = hottest_pid(w.scan_before, w.scan_after, w.groups, python_only=False)
    out: dict[str, Any] = {"profiles": []}
    if overall is not None:
        out["hottest_process"] = {"pid": overall[0], "group": overall[1]}
    targets = profile_targets(w.cpu, busiest_by_group(w))
    if not targets:
        return {**out, "error": "no Python process to profile"}
    results_dir.mkdir(parents=True, exist_ok=True)
    for pid, group in targets:
        path = results_dir / f"stress_pyspy_{group}.speedscope.json"
        log(f"bench: py-spy record {duration_s}s of pid {pid} ({group}) → {path}")
        out["profiles"].append({"pid": pid, "group": group, **py_spy_record(pid, path, duration_s)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short steps (≈20 s)")
    ap.add_argument("--start-msg-s", type=float, default=500.0)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--step-s", type=float, default=None, help="measured window (45; quick 20)")
    ap.add_argument("--settle-s", type=float, default=None, help="before each window (10; quick 5)")
    ap.add_argument("--profile-s", type=int, default=None, help="py-spy duration (20; quick 10)")
    ap.add_argument(
        "--handler",
        choices=["noop", "record"],
        default="noop",
        help="noop: stamps only (batched); record: + the recording handler's Redis side effect",
    )
    ap.add_argument(
        "--drain-timeout-s", type=float, default=120.0, help="give up draining after no progress"
    )
    ap.add_argument(
        "--refine",
        type=int,
        default=2,
        help="after the first break, bisect this many times between it and the step before",
    )
    ap.add_argument(
        "--trace",
        action="store_true",
        help="record each step once a second (created, in Kafka, committed, AOF rewrite)",
    )
    ap.add_argument(
        "--aof-rewrite",
        choices=AOF_REWRITE_MODES,
        default="between-steps",
        help="when the bench Redis rewrites its AOF (see AOF_REWRITE_MODES)",
    )
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.quick:
        os.environ[QUICK_ENV] = "1"
    quick = quick_mode()
    step_s = args.step_s or (20.0 if quick else 45.0)
    settle_s = args.settle_s if args.settle_s is not None else (5.0 if quick else 10.0)
    profile_s = args.profile_s or (10 if quick else 20)
    rates = step_rates(args.start_msg_s, args.factor, args.max_steps)
    handler = NOOP_STAMPED_HANDLER if args.handler == "noop" else STAMPED_HANDLER
    tag = uuid.uuid4().hex[:8]
    sim_args = [
        "--users",
        str(args.users),
        "--rate",
        f"{rates[0] * 60.0 / args.users}/min",
        "--mix",
        "text=1",
        "--stamp-created-ms",
        "--seed",
        "11",
    ]
    overrides = pipeline_overrides(tag, handler, protect=False)
    steps: list[dict[str, Any]] = []
    breaking: dict[str, Any] | None = None
    refined: dict[str, Any] | None = None
    with bench_stack() as stack, running_pipeline(stack, "stress", sim_args, overrides) as p:
        reader = StampReader(p)
        if args.aof_rewrite != "redis":
            p.redis_client().config_set("auto-aof-rewrite-percentage", 0)
        wait_first_stamps(p)

        last_drain_rewrite: dict[str, dict[str, Any]] = {}  # the drain's, for the next step

        def step(i: int, target: float, refine: bool = False) -> tuple[dict[str, Any], Any]:
            # A ladder step's rewrite runs at the previous rate; a bisection's ran in the
            # drain before it (the pipeline idle); a second attempt's file has grown by
            # one window only.
            rewrite = None
            if args.aof_rewrite == "between-steps" and not refine:
                rewrite = rewrite_aof(p)
            elif refine:
                rewrite = last_drain_rewrite.pop("rewrite", None)
            for attempt in range(2):
                log(f"bench: stress step {i}: {target:.0f} msg/s (attempt {attempt})")
                row, w = run_step(
                    p, stack, reader, target, args.users, settle_s, step_s, 2.0, args.trace
                )
                row.update(step=i, attempt=attempt, refined=refine, aof_rewrite=args.aof_rewrite)
                if attempt == 0 and rewrite is not None:
                    row["aof_rewrite_before"] = rewrite  # its backlog: ingest_backlog_start
                # On this shared machine a neighbour's burst can spike p99 with no
                # backlog: a latency-only break is measured once more before it counts.
                row["retried"] = retry_step(row["reasons"], attempt)
                steps.append(row)
                emit_step(row)
                log(f"bench: step {i}: {row}")
                if not row["retried"]:
                    break
            return row, w

        def drain() -> bool:
            """Pause the population and wait until every message so far is handled."""
            sim_post(p, "/sim/population/pause")
            assert p.sim is not None
            truth = p.sim.truth()
            expected = sum(len(ids) for users in truth.values() for ids in users.values())
            drained = wait_all_stamped(p, reader, expected, args.drain_timeout_s)
            if args.aof_rewrite == "between-steps":
                last_drain_rewrite["rewrite"] = rewrite_aof(p)
            return drained

        def resume_at(rate: float) -> None:
            sim_post(p, "/sim/population/rates", {"rate_per_min": rate * 60.0 / args.users})
            sim_post(p, "/sim/population/resume")

        held: float | None = None
        for i, target in enumerate(rates):
            row, w = step(i, target)
            if row["broke"]:
                breaking = {"step": i, "target_msg_s": row["target_msg_s"], "why": row["reasons"]}
                cpu = row["cpu_pct_by_group"]
                breaking["busiest_groups"] = list(cpu.items())[:4]
                breaking.update(profile_hottest(w, profile_s, args.results))
                break
            held = target
        if breaking is not None:
            broke_at = float(breaking["target_msg_s"])
            refined = refine_between(held, broke_at, args.refine, step, drain, resume_at)
        # After a drain that already failed, a second wait would only spend the bench's time.
        drained = False if refined and refined.get("stopped") else drain()
        dead = {k.decode() for k in p.redis_client().hkeys("qywx:dlq:letters")}
        assert p.sim is not None
        audit = audit_stamps(p.sim.truth(), reader.refresh(), dead)
        reasons = dead_letter_reasons(p)
    summary = {
        "steps": len(steps),
        "refined": refined,
        "max_ok_msg_s": max((s["processed_msg_s"] for s in steps if not s["broke"]), default=None),
        "breaking": breaking,
        "drained_after": drained,
        "audit": audit.as_dict(),
        "dead_letters_by_reason": reasons,
        "handler": args.handler,
        "users": args.users,
        "aof_rewrite": args.aof_rewrite,
    }
    if breaking is None:
        summary["note"] = f"no step broke up to {rates[-1]:.0f} msg/s"
    emit(kind="stress_summary", bench="stress", case="summary", run=0, result=summary)
    log(f"bench: stress summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

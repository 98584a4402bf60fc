"""Dedicated actor cold start: where a new user's first message waits.

The real path (consume.hosts.get_or_create_user_actor, the real DedicatedUserActor with
development-profile settings) on its own local Ray (4 logical CPUs, no dashboard) and a
throwaway Kafka + Redis (bench.services). Per run and per N (default 20 and 50) all N
actors are asked for at once, as a burst of new users would; measured:

- `time_to_first_answer` p50/p99 (s): from `.remote()` creating the actor to its first
  answered `incarnation_id` call (= process start + imports + settings unpickling +
  the actor's __init__ + Ray scheduling);
- `actor_starts_per_s`: N over the time until the last one answered;
- `start_cpu_per_actor_s`: CPU each worker process had used by then (its start cost);
- `rss_per_actor` / `pss_per_actor` / `uss_per_actor` (MiB): the mean resident, proportional
  (shared pages split) and private memory of the actors' worker processes once all answered;
  uss is what one more actor costs, rss counts Ray's and Python's shared libraries again
  in each;
- `mem_available_drop_per_actor` (MiB): the node's MemAvailable before the burst minus
  after it, over N (the actors plus what Ray's raylet/GCS keep for them);
- `threads_per_actor`: threads in one worker process;
- `idle_cpu_per_actor` (% of one core): their CPU over a --idle-s window with no traffic,
  opened --settle-s (10) after the last answer (the burst's tail is not idle cost);
- `node_idle_cpu_per_actor` (% of one core): the whole machine's busy CPU in that window
  minus its busy CPU in an equal window just before the burst, over N (Ray's own
  per-actor bookkeeping in the raylet and GCS included).

With `--empty` (default) each run also measures N empty Ray actors the same way (case
`empty_nN`): what any one-actor-per-user design pays on Ray, against which ours is read.

Actors are killed by handle after each run (and a run waits until their processes are
gone before the next baseline). Every line carries load1; medians of
--runs runs at the end (case suffix `_median`).

  python -m bench.bench_actor_start [--runs 3] [--users 20 50] [--idle-s 10]
"""

# bench-timeout-s: full=1200 quick=600

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench import machine
from bench.output import emit, log
from bench.procs import cpu_seconds, proc_memory, thread_count
from bench.services import bench_services

BENCH = "actor_start"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _idle_window(idle_s: float) -> float | None:
    """The machine's busy CPU (% of one core) over `idle_s` of no traffic."""
    j0 = machine.cpu_jiffies()
    time.sleep(idle_s)  # the measured idle window itself, not synchronisation
    return machine.busy_pct(j0, machine.cpu_jiffies())


def _wait_gone(pids: list[int], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(Path(f"/proc/{p}").exists() for p in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"killed actors' processes still running after {timeout_s:.0f} s")
        time.sleep(0.2)


def _kill_all(handles: list[Any], pids: list[int]) -> None:
    """Best effort, also after a failed run: no detached actor outlives its run."""
    import ray

    for h in handles:
        try:
            ray.kill(h, no_restart=True)
        except Exception as exc:  # the others still get killed
            log(f"actor_start: kill failed: {exc!r}")
    if pids:
        _wait_gone(pids)


def _empty_actor_class() -> Any:
    """Ray's floor: an actor with nothing of ours in it, created the way ours are
    (num_cpus=0, max_concurrency=1, detached, named)."""
    import ray

    @ray.remote(num_cpus=0)
    class EmptyActor:
        def incarnation_id(self) -> str:
            return ""

        def pid(self) -> int:
            return os.getpid()

    return EmptyActor


def one_run(settings: Any, n: int, idle_s: float, kind: str, settle_s: float) -> dict[str, float]:
    import ray

    from qywx_ray.consume.hosts import get_or_create_user_actor, user_actor_name

    busy_before = _idle_window(idle_s)
    avail0 = machine.meminfo_bytes("MemAvailable")
    tag = uuid.uuid4().hex[:6]
    empty = _empty_actor_class() if kind == "empty" else None
    handles: list[Any] = []
    pids: list[int] = []
    t0 = time.perf_counter()
    try:
        if empty is not None:
            handles = [
                empty.options(
                    name=f"empty-{tag}-{i}", lifetime="detached", max_concurrency=1
                ).remote()
                for i in range(n)
            ]
        else:
            handles = [
                get_or_create_user_actor(settings, user_actor_name(f"kf{tag}", f"u{i}"))
                for i in range(n)
            ]
        pending = {h.incarnation_id.remote(): i for i, h in enumerate(handles)}
        answered: list[float] = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=300)
            if not done:
                raise RuntimeError(f"{len(pending)} actors did not answer in 300 s")
            ray.get(done[0])
            answered.append(time.perf_counter() - t0)
            del pending[done[0]]
        pids = ray.get([h.pid.remote() for h in handles])
        mem = [proc_memory(p) for p in pids]
        avail1 = machine.meminfo_bytes("MemAvailable")
        threads = [thread_count(p) for p in pids]
        # The burst's tail (the raylet and GCS finishing its bookkeeping, workers
        # settling) is not idle cost: it passes before the window opens.
        time.sleep(settle_s)  # a fixed pause before a measurement, not synchronisation
        cpu0 = [cpu_seconds(p) for p in pids]
        w0 = time.perf_counter()
        busy_with = _idle_window(idle_s)
        window = time.perf_counter() - w0
        idle = [(cpu_seconds(p) - c) / window * 100 for p, c in zip(pids, cpu0, strict=True)]
    finally:
        _kill_all(handles, pids)
    mib = 1024 * 1024
    out = {
        "ttfa_p50_s": _pct(answered, 0.5),
        "ttfa_p99_s": _pct(answered, 0.99),
        "actor_starts_per_s": n / answered[-1],
        "rss_per_actor_mib": statistics.mean(m["rss"] for m in mem) / mib,
        "pss_per_actor_mib": statistics.mean(m["pss"] for m in mem) / mib,
        "uss_per_actor_mib": statistics.mean(m["uss"] for m in mem) / mib,
        "threads_per_actor": statistics.mean(threads),
        "start_cpu_per_actor_s": statistics.mean(cpu0),
        "idle_cpu_per_actor_pct": statistics.mean(idle),
    }
    if avail0 is not None and avail1 is not None:
        out["mem_available_drop_per_actor_mib"] = (avail0 - avail1) / n / mib
    if busy_before is not None and busy_with is not None:
        out["node_idle_cpu_per_actor_pct"] = (busy_with - busy_before) / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--users", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--label", default="", help="recorded as `variant` (e.g. before/after)")
    ap.add_argument(
        "--settle-s",
        type=float,
        default=10.0,
        help="after the last actor answered, before the idle window opens",
    )
    ap.add_argument(
        "--empty",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure N empty Ray actors the same way (case empty_nN): Ray's floor",
    )
    ap.add_argument(
        "--system-config", default="{}", help="JSON for ray.init(_system_config=...), recorded"
    )
    args = ap.parse_args()
    import ray

    with bench_services(overrides={"consume": {"mode": "dedicated"}}) as svc:
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            namespace=f"bench-actor-{uuid.uuid4().hex[:6]}",
            configure_logging=False,
            _system_config=json.loads(args.system_config),
        )
        try:
            settings = svc.settings
            kinds = ["dedicated", "empty"] if args.empty else ["dedicated"]
            results: dict[tuple[str, int], list[dict[str, float]]] = {
                (k, n): [] for k in kinds for n in args.users
            }
            for run in range(args.runs):
                # Alternate which kind goes first: neither always meets the other's
                # leftovers (exiting workers, a busier raylet).
                first = kinds if run % 2 == 0 else kinds[::-1]
                order = [(k, n) for k in first for n in args.users]
                for kind, n in order:
                    log(f"actor_start: run {run} {kind} N={n}")
                    r = one_run(settings, n, args.idle_s, kind, args.settle_s)
                    results[kind, n].append(r)
                    for metric, value in r.items():
                        emit(
                            bench=BENCH, case=f"{kind}_n{n}", metric=metric,
                            value=round(value, 4), run=run, users=n, variant=args.label,
                            system_config=args.system_config, settle_s=args.settle_s,
                        )  # fmt: skip
            for (kind, n), rs in results.items():
                for metric in rs[0]:
                    vals = [r[metric] for r in rs if metric in r]
                    emit(
                        bench=BENCH, case=f"{kind}_n{n}_median", metric=metric,
                        value=round(statistics.median(vals), 4), min=round(min(vals), 4),
                        max=round(max(vals), 4), users=n, variant=args.label,
                        system_config=args.system_config, settle_s=args.settle_s,
                    )  # fmt: skip
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()

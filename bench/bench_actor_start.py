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
- `rss_per_actor` (MiB): the mean VmRSS of the actors' worker processes once all answered;
- `idle_cpu_per_actor` (% of one core): their CPU over a --idle-s window with no traffic.

Actors are killed by handle after each run. Every line carries load1; medians of
--runs runs at the end (case suffix `_median`).

  python -m bench.bench_actor_start [--runs 3] [--users 20 50] [--idle-s 10]
"""

# bench-timeout-s: full=1200 quick=600

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

from bench.output import emit, log
from bench.procs import cpu_seconds
from bench.services import bench_services

BENCH = "actor_start"


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_run(settings: Any, n: int, idle_s: float) -> dict[str, float]:
    import ray

    from qywx_ray.consume.hosts import get_or_create_user_actor, user_actor_name

    tag = uuid.uuid4().hex[:6]
    t0 = time.perf_counter()
    handles = [
        get_or_create_user_actor(settings, user_actor_name(f"kf{tag}", f"u{i}")) for i in range(n)
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
    rss = [_rss_mib(p) for p in pids]
    cpu0 = [cpu_seconds(p) for p in pids]
    w0 = time.perf_counter()
    time.sleep(idle_s)  # the measured idle window itself, not synchronisation
    window = time.perf_counter() - w0
    idle = [(cpu_seconds(p) - c) / window * 100 for p, c in zip(pids, cpu0, strict=True)]
    for h in handles:
        ray.kill(h, no_restart=True)
    return {
        "ttfa_p50_s": _pct(answered, 0.5),
        "ttfa_p99_s": _pct(answered, 0.99),
        "actor_starts_per_s": n / answered[-1],
        "rss_per_actor_mib": statistics.mean(rss),
        "start_cpu_per_actor_s": statistics.mean(cpu0),
        "idle_cpu_per_actor_pct": statistics.mean(idle),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--users", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--label", default="", help="recorded as `variant` (e.g. before/after)")
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
            results: dict[int, list[dict[str, float]]] = {n: [] for n in args.users}
            for run in range(args.runs):
                for n in args.users:
                    log(f"actor_start: run {run} N={n}")
                    r = one_run(settings, n, args.idle_s)
                    results[n].append(r)
                    for metric, value in r.items():
                        emit(
                            bench=BENCH, case=f"dedicated_n{n}", metric=metric,
                            value=round(value, 4), run=run, users=n, variant=args.label,
                            system_config=args.system_config,
                        )  # fmt: skip
            for n, rs in results.items():
                for metric in rs[0]:
                    vals = [r[metric] for r in rs]
                    emit(
                        bench=BENCH, case=f"dedicated_n{n}_median", metric=metric,
                        value=round(statistics.median(vals), 4), min=round(min(vals), 4),
                        max=round(max(vals), 4), users=n, variant=args.label,
                        system_config=args.system_config,
                    )  # fmt: skip
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()

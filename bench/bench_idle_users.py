"""Idle hosted users: memory per idle user and the CPU cost of the idle sweep.

Goal: <= 10 KiB per idle hosted user, no per-user timers. Real Ray host
actors (consume.hosts.start_hosts, noop handler, protection off, real Redis for dedup
marks) receive one message for each of --users users (default 100,000) through their
actor API (`deliver`, batches of 1,000, each user routed to host_index()'s host), as
the partition consumers would send them; a small sink actor takes the completions.
Measured per run, on fresh hosts:

- `rss_per_idle_user`: host RSS (and USS: private pages) after the users went idle
  minus before, over the users added; the "before" is taken after a recorded warm-up
  of 1,000 users, so imports and lazy clients are not charged to the users.
- `sweep_cpu`: the hosts' CPU over an idle window with all users hosted minus the same
  window with only the warm-up users, per sweep (idle_sweep_interval_s is set to 1 s
  here to have many sweeps in the window; the default is 5 s).

Every line carries load1; medians of 3 runs at the end.

  python -m bench.bench_idle_users [--quick] [--users 100000] [--idle-window-s 20]
"""

# bench-timeout-s: full=1500 quick=600

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

from bench.output import emit, log
from bench.procs import cpu_seconds, proc_memory
from bench.runs import default_runs, quick_mode
from bench.services import bench_services
from bench.stats import median

WARM_USERS = 1000
BATCH = 1000
SWEEP_INTERVAL_S = 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--users", type=int, default=None, help="idle users (100k; quick 10k)")
    ap.add_argument("--idle-window-s", type=float, default=None, help="(20; quick 8)")
    args = ap.parse_args(argv)
    if args.quick:
        os.environ["QYWX_BENCH_QUICK"] = "1"
    users = args.users or (10_000 if quick_mode() else 100_000)
    window_s = args.idle_window_s or (8.0 if quick_mode() else 20.0)
    import ray

    with bench_services() as svc:
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            results: dict[str, list[float]] = {}
            for run in range(default_runs(3)):
                row = one_run(svc, users, window_s, run)
                for metric, value, unit in row:
                    results.setdefault(f"{metric}|{unit}", []).append(value)
            for key, values in results.items():
                metric, unit = key.split("|")
                emit(
                    bench="idle_users",
                    case="hosted",
                    metric=f"{metric}_median",
                    kind="summary",  # the report takes its own medians of the runs
                    value=round(median(values), 3),
                    unit=unit,
                    run=-1,
                    users=users,
                    extra={"min": round(min(values), 3), "max": round(max(values), 3)},
                )
        finally:
            ray.shutdown()
    return 0


def one_run(svc: Any, users: int, window_s: float, run: int) -> list[tuple[str, float, str]]:
    import ray

    from bench.services import settings_for
    from qywx_ray.consume.hosts import host_index, start_hosts
    from qywx_ray.consume.types import Delivery, pack_deliveries
    from qywx_ray.envelope import Envelope

    tag = uuid.uuid4().hex[:6]
    namespace = f"bench-idle-{tag}"
    settings = settings_for(
        svc.bootstrap_servers,
        svc.redis_url,
        svc.workdir,
        {
            "consume": {
                "namespace": namespace,
                "name_prefix": f"idle{tag}",
                "num_hosts": 2,
                "handler": "qywx_ray.consume.handlers:noop_handler",
                "idle_lifetime_s": 36_000.0,  # nobody leaves during the run
                "idle_sweep_interval_s": SWEEP_INTERVAL_S,
            },
            "protect": {"enabled": False},
        },
        tag=tag,
    )

    @ray.remote(num_cpus=0)
    class Sink:
        """Stands in for the partition consumers: counts completions."""

        def __init__(self) -> None:
            self.done = 0

        def complete(self, packed: list[list[Any]]) -> None:
            self.done += sum(len(offsets) for _t, _p, offsets in packed)

        def count(self) -> int:
            return self.done

    sink = Sink.options(name="bench-idle-sink", namespace=namespace).remote()  # type: ignore[attr-defined]
    hosts = start_hosts(settings)
    pids = ray.get([h.pid.remote() for h in hosts], timeout=60)
    offset = 0

    def deliver(first: int, count: int, prefix: str) -> float:
        nonlocal offset
        started = time.monotonic()
        per_host: list[list[Delivery]] = [[] for _ in hosts]
        refs = []
        incarnations = ray.get([h.incarnation_id.remote() for h in hosts], timeout=60)
        for u in range(first, first + count):
            user = f"{prefix}{u:07d}"
            env = Envelope(
                message_id=f"{user}-0",
                open_kfid="wkIdle",
                external_userid=user,
                msgtype="text",
                raw={"text": {"content": "hi"}},
            )
            d = Delivery(
                "bench-idle",
                0,
                offset,
                env.ingest_ts_ms,
                user,
                env.to_bytes(),
                env.message_id,
                "bench-idle-sink#1",
            )
            offset += 1
            i = host_index(user, len(hosts))
            per_host[i].append(d)
            if len(per_host[i]) >= BATCH:
                refs.append(hosts[i].deliver.remote(pack_deliveries(per_host[i]), incarnations[i]))
                per_host[i] = []
        for i, batch in enumerate(per_host):
            if batch:
                refs.append(hosts[i].deliver.remote(pack_deliveries(batch), incarnations[i]))
        ray.get(refs, timeout=600)
        return time.monotonic() - started

    def wait_done(expected: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while ray.get(sink.count.remote(), timeout=60) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {ray.get(sink.count.remote())}/{expected} completed")
            time.sleep(0.5)  # polling a counter, bounded by the deadline

    def hosted() -> int:
        return sum(s["users"] for s in ray.get([h.snapshot.remote() for h in hosts], timeout=60))

    def idle_cpu_s() -> float:
        before = [cpu_seconds(p) for p in pids]
        time.sleep(window_s)  # the measured idle window itself
        return sum(cpu_seconds(p) - b for p, b in zip(pids, before, strict=True))

    out: list[tuple[str, float, str]] = []
    try:
        # ids unique per run: a done-flag left in Redis by an earlier run would make the
        # host skip the message as a duplicate and host nobody
        warm_s = deliver(0, WARM_USERS, f"{tag}warm")
        wait_done(WARM_USERS, 300)
        emit(
            bench="idle_users",
            case="warmup",
            metric="users_created",
            value=WARM_USERS,
            unit="users",
            run=run,
            warmup=True,
            extra={"deliver_s": round(warm_s, 2)},
        )
        time.sleep(2 * SWEEP_INTERVAL_S)  # let the warm users' sweep state settle
        mem0 = [proc_memory(p) for p in pids]
        cpu_base = idle_cpu_s()
        t0 = time.monotonic()
        deliver(0, users, f"{tag}idle")
        wait_done(WARM_USERS + users, 900)
        create_s = time.monotonic() - t0
        n_hosted = hosted()
        if n_hosted < WARM_USERS + users:
            raise RuntimeError(f"hosts hold {n_hosted} users, expected {WARM_USERS + users}")
        time.sleep(2 * SWEEP_INTERVAL_S)
        mem1 = [proc_memory(p) for p in pids]
        cpu_full = idle_cpu_s()
        rss_delta = sum(m1["rss"] - m0["rss"] for m0, m1 in zip(mem0, mem1, strict=True))
        uss_delta = sum(m1["uss"] - m0["uss"] for m0, m1 in zip(mem0, mem1, strict=True))
        sweeps = window_s / SWEEP_INTERVAL_S * len(hosts)
        sweep_ms = max(cpu_full - cpu_base, 0.0) / sweeps * 1000
        facts = {
            "hosts": len(hosts),
            "hosted_users": n_hosted,
            "rss_before_mib": [round(m["rss"] / 2**20, 1) for m in mem0],
            "rss_after_mib": [round(m["rss"] / 2**20, 1) for m in mem1],
            "create_s": round(create_s, 2),
            "idle_cpu_s_warm_only": round(cpu_base, 3),
            "idle_cpu_s_all_users": round(cpu_full, 3),
            "idle_window_s": window_s,
            "sweep_interval_s": SWEEP_INTERVAL_S,
        }
        per_user_rss = rss_delta / users / 1024
        per_user_uss = uss_delta / users / 1024
        per_host_users = users / len(hosts)
        sweep_us_per_user = sweep_ms * 1000 / per_host_users
        # At the default 5 s interval, one core's share spent sweeping this many users:
        sweep_core_pct_default = sweep_ms / 1000 / 5.0 * len(hosts) * 100
        for metric, value, unit in (
            ("rss_per_idle_user", per_user_rss, "KiB"),
            ("uss_per_idle_user", per_user_uss, "KiB"),
            ("sweep_cpu_per_sweep", sweep_ms, "ms"),
            ("sweep_cpu_per_user", sweep_us_per_user, "us"),
            ("sweep_core_pct_at_5s", sweep_core_pct_default, "%"),
            ("users_created_per_s", users / create_s, "users/s"),
        ):
            out.append((metric, value, unit))
            emit(
                bench="idle_users",
                case="hosted",
                metric=metric,
                value=round(value, 3),
                unit=unit,
                run=run,
                users=users,
                extra=facts,
            )
        log(f"bench: idle users run {run}: {facts} rss/user={per_user_rss:.2f} KiB")
    finally:
        for h in hosts:
            ray.kill(h, no_restart=True)
        ray.kill(sink, no_restart=True)
    return out


if __name__ == "__main__":
    sys.exit(main())

"""The consume drain of bench_consume.py on a 3-node Ray cluster: the check of
docs/capacity.md's model against a measured multi-node run.

A head plus 2 worker nodes on this machine (`LocalRayCluster`, each its own raylet, 1 CPU,
own temp dir), consumers and user hosts placed with `placement.strategy: SPREAD` and the
hosts on the workers (`qywx_worker`), 10,000 users x 5 messages backlogged on 4
partitions, trivial handler, protections on: bench_consume's `ModeBench.drain` unchanged,
so the lines are comparable with `hosted_trivial` there. Also prints where each actor ran
and the load average. JSON lines on stdout:

    python -m bench.bench_multinode > bench/results/compare/multinode_<commit>.jsonl
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any

import ray

from bench import bench_consume, output
from bench.output import emit, log
from bench.runs import default_runs
from bench.services import bench_services
from qywx_ray.devstack.raycluster import LocalRayCluster

PLACEMENT = {"strategy": "SPREAD", "resources": {"user_host": {"qywx_worker": 1.0}}}


def _with_placement(original: Any) -> Any:
    def settings_for(*a: Any, overrides: dict[str, Any] | None = None, **kw: Any) -> Any:
        return original(*a, overrides={**(overrides or {}), "placement": PLACEMENT}, **kw)

    return settings_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=default_runs(3))
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--per-user", type=int, default=5)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=300.0)
    args = ap.parse_args()
    ns = argparse.Namespace(
        users=args.users,
        dedicated_users=0,
        partitions=4,
        fetch_min_bytes=1,
        hosts=args.hosts,
        consumers=args.consumers,
        poll_linger_ms=None,
        timeout_s=args.timeout_s,
    )
    output._EMITTER.stream = sys.stdout
    sys.stdout = sys.stderr
    bench_consume.settings_for = _with_placement(bench_consume.settings_for)
    temp_dir = tempfile.mkdtemp(prefix="qywx-bm-", dir="/tmp")  # short: socket paths
    cluster = LocalRayCluster(nodes=args.nodes, temp_dir=temp_dir)
    with bench_services() as svc:
        try:
            cluster.start()
            ray.init(address=cluster.address, namespace="bench", log_to_driver=False)
            names = cluster.node_names()
            for run in range(args.runs):
                log(f"multinode bench: run {run} (load {os.getloadavg()[0]:.1f})")
                b = bench_consume.ModeBench(ns, svc, "hosted", run)
                b.pipeline = bench_consume.start_consumers(b.settings)
                placed = _placement(b, names)
                bench_consume.stop_consumers(b.pipeline, timeout_s=30, kill_hosts=False)
                b.pipeline = None
                b.drain("trivial", args.per_user, 0, ceiling=False)
                emit(
                    case="multinode_placement",
                    metric="nodes",
                    value=args.nodes,
                    unit="nodes",
                    bench="multinode",
                    run=run,
                    extra={"placement": placed, "loadavg": os.getloadavg()},
                )
                b.stop_all()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _placement(b: Any, names: dict[str, str]) -> dict[str, str]:
    """Consumer and host actor -> node name (head / w1 / w2)."""
    out = {}
    for group, handles in (("consumer", b.pipeline.consumers), ("host", b._hosts())):
        for i, h in enumerate(handles):
            node = ray.get(h.where.remote(), timeout=60)["node_id"]
            out[f"{group}-{i}"] = names.get(str(node), "?")
    return out


if __name__ == "__main__":
    main()

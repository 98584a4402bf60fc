"""The node-loss drill's short form in a process of its own (`make test` runs it this way).

`python -m tests.drills.multinode_child --workdir DIR --ray-temp-dir TMP [--bootstrap B]`
starts a 3-node Ray cluster (its own temp dir, so its own sessions, sockets and ports),
the pipeline on it (its own Redis; the given Kafka with topics of its own, or its own
Kafka), runs the node-loss drill of `test_multinode_drills` and prints its report as one
line `multinode drill: {json}`; exit code 0 only if the drill's asserts and the audit
(lost=0 reordered=0 duplicated_side_effects=0) held.

Why a process of its own: the drill replaces the driver's Ray with a cluster and, in
pytest, had to start the session's one-node Ray again afterwards, which failed at load ~20
("node timed out during startup") and failed the run. Here the session's Ray is never
touched; the caller records nothing but a directory and stops what is left by PID
(`stop_recorded`, pidfiles, `stop_ray_under`) if this process dies midway.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid
from pathlib import Path
from typing import Any

from qywx_ray.devstack.pipeline import LocalPipeline
from qywx_ray.devstack.raycluster import LocalRayCluster, stop_ray_under
from qywx_ray.settings import _deep_merge
from tests.helpers.drills import DRILL_PROTECT
from tests.helpers.multinode import FAST_NODE_DEATH, MULTINODE, node_loss


def run(workdir: Path, temp_dir: str, bootstrap: str | None, users: int) -> dict[str, Any]:
    import ray

    tag = uuid.uuid4().hex[:8]
    overrides: dict[str, Any] = _deep_merge(
        _deep_merge(DRILL_PROTECT, MULTINODE),
        {"dlq": {"recovery_actor_name": f"drill-rec-{tag}"}},
    )
    if bootstrap:  # a shared Kafka: topics of this run's own
        overrides = _deep_merge(
            overrides,
            {
                "kafka": {
                    "main_topic": {"name": f"nl-main-{tag}"},
                    "dlq_topic": {"name": f"nl-dlq-{tag}"},
                }
            },
        )
    cluster = LocalRayCluster(nodes=3, system_config=FAST_NODE_DEATH, temp_dir=temp_dir)
    pipeline: LocalPipeline | None = None
    try:
        cluster.start()
        cluster.record(workdir)  # the caller's way back to these PIDs
        ray.init(
            address=cluster.address,
            namespace="qywx-test",
            log_to_driver=False,
            configure_logging=False,
        )
        pipeline = LocalPipeline(workdir / "pipeline", overrides=overrides, bootstrap=bootstrap)
        pipeline.start()
        return node_loss(pipeline, cluster, users=users, before_s=2.0, after_s=1.0, add_back=False)
    finally:
        if pipeline is not None:
            with contextlib.suppress(Exception):
                pipeline.stop()
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()
        stop_ray_under(temp_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--ray-temp-dir", required=True, help="short: sockets live under it")
    parser.add_argument("--bootstrap", default=None, help="a running Kafka; default: own")
    parser.add_argument("--users", type=int, default=3)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    run(args.workdir, args.ray_temp_dir, args.bootstrap, args.users)  # prints its report
    return 0


if __name__ == "__main__":
    sys.exit(main())

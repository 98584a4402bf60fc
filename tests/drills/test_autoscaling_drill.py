"""Autoscaling seen once: Ray's autoscaler adds a worker node when the pipeline asks for
more than the nodes offer, and removes it once idle, while customers keep chatting.

The cluster: a head (no `qywx_worker`) whose autoscaler starts worker nodes on this
machine (Ray's fake multi-node provider; `LocalAutoscalingCluster`: own temp dir and
port, stopped by PID). Worker nodes offer `qywx_worker: 1` and user hosts need it
(`placement.resources.user_host`), so each user host needs a node of its own:
1. the pipeline starts with `consume.num_hosts: 1` -> the autoscaler adds one worker;
2. `num_hosts` is raised to 2 (ordered stop of the consumers, start with the new value,
   as an operator would) -> a second worker is added and the new host runs there;
3. `num_hosts` back to 1 -> the second worker is idle and is removed after
   `idle_timeout_minutes`;
then the audit: every message processed once, per user in order. Prints one line
`autoscaling drill: {json}` with the times measured.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.devstack.pipeline import LocalPipeline
from qywx_ray.devstack.procs import wait_until
from qywx_ray.devstack.raycluster import LocalAutoscalingCluster
from qywx_ray.settings import _deep_merge
from tests.helpers.drills import DRILL_PROTECT, Chatter, finish

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

WORKER_TYPES = {
    "qywx.worker": {
        # No CPU: only what asks for `qywx_worker` (the user hosts) makes the autoscaler
        # add one; a first run with CPU 1 got a second worker for other demand, and
        # actors without placement rules landed there, so it never went idle.
        "resources": {"CPU": 0, "qywx_worker": 1, "object_store_memory": 100 * 1024 * 1024},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 3,
    }
}
IDLE_TIMEOUT_MIN = 0.25  # 15 s: the drill waits for it, production keeps 10 min
# Everything but the user hosts stays on the head (`qywx_head`), so a worker node holds
# only the host it was added for and is idle once that host is gone.
ON_HEAD = {"qywx_head": 1.0}
PIPELINE = {
    "placement": {
        "resources": {
            "user_host": {"qywx_worker": 1.0},
            "consumer": ON_HEAD,
            "syncer_host": ON_HEAD,
            "dlq_recovery": ON_HEAD,
        }
    },
    "consume": {"num_consumers": 2, "num_hosts": 1},
    "ingest": {"num_syncer_hosts": 1},
}


@pytest.fixture
def autoscaling() -> Iterator[LocalAutoscalingCluster]:
    """The autoscaling cluster as this process's Ray; the session's Ray is back after."""
    import ray

    from tests.helpers.ray import init_local_ray

    had_session_ray = ray.is_initialized()
    ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="qywx-as-", dir="/tmp")  # short: socket paths
    cluster = LocalAutoscalingCluster(
        temp_dir,
        WORKER_TYPES,
        head_cpus=2,
        head_resources={"qywx_head": 100.0},
        idle_timeout_minutes=IDLE_TIMEOUT_MIN,
    )
    try:
        cluster.start()
        ray.init(
            address=cluster.address,
            namespace="qywx-test",
            log_to_driver=False,
            configure_logging=False,
        )
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if had_session_ray:
            init_local_ray()


def _workers(cluster: LocalAutoscalingCluster) -> set[str]:
    return {n["NodeID"] for n in cluster.alive_nodes() if n["Resources"].get("qywx_worker")}


def _resize_hosts(p: LocalPipeline, num_hosts: int) -> None:
    """What an operator does to change `consume.num_hosts`: drain and stop the consumers
    (watermarks committed), start them with the new value."""
    from qywx_ray.consume.pipeline import start_consumers, stop_consumers

    assert p.settings is not None
    stop_consumers(p.consume, timeout_s=30)
    consume = p.settings.consume.model_copy(update={"num_hosts": num_hosts})
    p.settings = p.settings.model_copy(update={"consume": consume})
    p.consume = start_consumers(p.settings)


def _host_nodes(p: LocalPipeline) -> dict[str, str | None]:
    return {a: n for a, n in p.actor_nodes(timeout_s=30).items() if "user-host" in a}


def test_autoscaler_adds_a_node_for_demand_and_removes_it_when_idle(
    autoscaling: LocalAutoscalingCluster, tmp_path: Path
) -> None:
    overrides: dict[str, Any] = _deep_merge(
        _deep_merge(DRILL_PROTECT, PIPELINE),
        {"dlq": {"recovery_actor_name": f"drill-rec-{uuid.uuid4().hex[:8]}"}},
    )
    assert _workers(autoscaling) == set()  # the head only: min_workers 0
    t0 = time.monotonic()
    p = LocalPipeline(tmp_path / "p", overrides=overrides)
    report: dict[str, Any] = {"drill": "autoscaling", "idle_timeout_minutes": IDLE_TIMEOUT_MIN}
    try:
        p.start()
        wait_until(lambda: len(_workers(autoscaling)) == 1, timeout_s=180, what="first worker")
        report["first_worker_after_s"] = round(time.monotonic() - t0, 1)
        first = _workers(autoscaling)
        with Chatter(p, ["wkA1"], users=4) as chatter:
            time.sleep(3.0)  # customers chat on one worker first
            t1 = time.monotonic()
            _resize_hosts(p, 2)
            wait_until(
                lambda: len(_workers(autoscaling)) == 2, timeout_s=180, what="a second worker"
            )
            report["second_worker_after_s"] = round(time.monotonic() - t1, 1)
            added = (_workers(autoscaling) - first).pop()
            wait_until(
                lambda: added in _host_nodes(p).values(),
                timeout_s=120,
                what="a user host on the added node",
            )
            report["hosts_after_raise"] = sorted(_host_nodes(p))
            time.sleep(3.0)  # and chat on two workers
            t2 = time.monotonic()
            _resize_hosts(p, 1)
            # The idle node goes after idle_timeout_minutes (plus the autoscaler's
            # round): bounded at 4x, well under the 10 min production value.
            wait_until(
                lambda: len(_workers(autoscaling)) == 1,
                timeout_s=IDLE_TIMEOUT_MIN * 60 * 4 + 60,
                what="the idle worker removed",
            )
            report["idle_worker_removed_after_s"] = round(time.monotonic() - t2, 1)
        audit = finish(p, chatter.total, timeout_s=240)
        report.update(
            messages=audit.messages,
            lost=audit.lost,
            reordered=audit.reordered_users,
            duplicated_side_effects=audit.duplicated_side_effects,
            handler_reruns=audit.handler_reruns,
        )
    finally:
        print(f"\nautoscaling drill: {json.dumps(report)}")
        p.stop()
    assert report["idle_worker_removed_after_s"] >= 0

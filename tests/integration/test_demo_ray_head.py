"""The demo's Ray head is stopped by PID (its own temp dir), never with `ray stop`,
which would end every Ray on the machine: here the session's Ray must survive it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import pytest

from qywx_ray.demo import start_ray_head, stop_ray_head
from qywx_ray.devstack.procs import free_port, pid_alive
from qywx_ray.devstack.raycluster import ray_pids_under

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_demo_stops_only_the_ray_it_started(ray_session: None) -> None:
    from ray._private.worker import global_worker

    node = global_worker.node
    assert node is not None
    other = [int(i.process.pid) for v in node.all_processes.values() for i in v]
    assert other
    assert all(pid_alive(p) for p in other)
    temp_dir = tempfile.mkdtemp(prefix="qywx-demo-t-", dir="/tmp")
    port = free_port()
    try:
        assert start_ray_head(
            temp_dir, port=port, dashboard_port=free_port(), metrics_port=free_port()
        )
        ours = ray_pids_under(temp_dir)
        assert ours
        assert not set(ours) & set(other)
        # The address the demo connects to answers (from another process: this one has
        # the session's Ray).
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import ray; ray.init(address='127.0.0.1:{port}'); "
                "print(int(ray.cluster_resources()['CPU']))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.stdout.strip().splitlines()[-1] == "4", probe.stderr[-2000:]
        # A second demo finds it running and does not start another.
        assert not start_ray_head(temp_dir + "-2", port=port)
    finally:
        stopped = stop_ray_head(temp_dir)
        shutil.rmtree(temp_dir + "-2", ignore_errors=True)
    assert stopped >= len(ours)
    assert not [p for p in ours if pid_alive(p)]
    assert all(pid_alive(p) for p in other), "the demo's stop ended another Ray"

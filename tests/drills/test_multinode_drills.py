"""Multi-node drills: a head plus two worker nodes on this machine, each its own raylet.

- Node loss: with customers chatting, a worker node is removed (its raylet and every
  worker process on it die at once, as in a VM loss). Its actors (named, detached,
  `max_restarts=-1`, spread by `placement.strategy: SPREAD`) come back on the surviving
  nodes and the audit ends clean. A node added afterwards receives new placements.
  The short form runs in `make test` in a process of its own
  (`tests/drills/multinode_child.py`): in-process, its teardown had to start the
  session's one-node Ray again, which failed at load ~20 ("node timed out during
  startup"); in its own process the session's Ray is never touched. The long form
  (and the short one in-process) run in `make drills`.
- GCS restart (`make drills`): the head's GCS, backed by its own Redis (Ray's GCS fault
  tolerance; never the data Redis), is killed mid-stream and started again. Our actors
  keep running in the same processes, their names still resolve, and the audit is clean.

Each prints one JSON line (`multinode drill: {...}`) with what was measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.devstack.pipeline import LocalPipeline
from qywx_ray.devstack.procs import stop_pidfile
from qywx_ray.devstack.raycluster import LocalRayCluster, stop_ray_under, stop_recorded
from qywx_ray.devstack.redis import RedisServer
from tests.helpers.drills import Chatter, finish
from tests.helpers.multinode import FAST_NODE_DEATH, MULTINODE, actors_placed, node_loss

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.mark.slow
def test_node_loss_short(
    ray_cluster_factory: Callable[..., LocalRayCluster],
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    cluster = ray_cluster_factory(nodes=3, system_config=FAST_NODE_DEATH)
    p = pipeline_factory(overrides=MULTINODE)
    node_loss(p, cluster, users=3, before_s=2.0, after_s=1.0, add_back=False)


# At idle the short drill took 72 s (+9 s teardown); at load ~20, 144 s (+33 s). The
# bound is for a hang, not a speed check.
CHILD_TIMEOUT_S = 420


@pytest.mark.timeout(CHILD_TIMEOUT_S + 120)
def test_node_loss_short_in_its_own_process(tmp_path: Path, kafka_bootstrap: str) -> None:
    """`make test`'s node loss: the short drill in a child process with its own Ray
    cluster (own temp dir), Redis and topics; the session's Ray is not disturbed."""
    root = Path(__file__).resolve().parents[2]
    temp_dir = tempfile.mkdtemp(prefix="qywx-nl-", dir="/tmp")  # short: socket paths
    argv = [sys.executable, "-m", "tests.drills.multinode_child", "--workdir", str(tmp_path)]
    argv += ["--ray-temp-dir", temp_dir, "--bootstrap", kafka_bootstrap]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        argv,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        pytest.fail(f"node-loss child still running after {CHILD_TIMEOUT_S} s:\n{out[-4000:]}")
    finally:
        # Whatever the child left (it stops all of it itself when it ends normally).
        stop_recorded(tmp_path)
        stop_ray_under(temp_dir)
        for pidfile in tmp_path.rglob("*.pid"):
            stop_pidfile(pidfile)
        shutil.rmtree(temp_dir, ignore_errors=True)
    lines = [x for x in out.splitlines() if x.startswith(("multinode drill:", "drill audit:"))]
    print("\n".join(lines))
    assert child.returncode == 0, out[-6000:]
    reports = [x for x in lines if x.startswith("multinode drill:")]
    assert reports, "the child printed no report"
    report = json.loads(reports[-1].partition(":")[2])
    assert report["actors_on_removed_node"], report
    assert (report["lost"], report["reordered"], report["duplicated_side_effects"]) == (0, 0, 0)
    assert report["messages"] > 0


@pytest.mark.slow
def test_node_loss_long(
    ray_cluster_factory: Callable[..., LocalRayCluster],
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    cluster = ray_cluster_factory(nodes=3)  # Ray's default node-death detection
    p = pipeline_factory(overrides=MULTINODE)
    node_loss(p, cluster, users=8, before_s=8.0, after_s=10.0, add_back=True)


@pytest.fixture
def gcs_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """The GCS's own Redis (never the data Redis); stopped after the cluster is."""
    server = RedisServer(tmp_path / "gcs-redis", appendfsync="always").start()
    yield server
    server.stop()


@pytest.mark.slow
def test_gcs_restart_with_redis_backed_gcs(
    gcs_redis: RedisServer,
    ray_cluster_factory: Callable[..., LocalRayCluster],
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    import ray

    cluster = ray_cluster_factory(nodes=3, gcs_redis_address=f"127.0.0.1:{gcs_redis.port}")
    p = pipeline_factory(overrides=MULTINODE)
    assert p.settings is not None
    with Chatter(p, ["wkG1", "wkG2"], users=6) as chatter:
        time.sleep(5.0)
        before = p.actor_nodes()
        pids_before: dict[str, Any] = {
            n: ray.get(ray.get_actor(n, namespace=p.settings.ray_namespace).where.remote())
            for n in before
        }
        t0 = time.monotonic()
        cluster.kill_gcs()
        time.sleep(5.0)  # the GCS stays down this long while customers chat
        cluster.restart_gcs()
        after = actors_placed(p)
        back_s = time.monotonic() - t0
        time.sleep(5.0)
    audit = finish(p, chatter.total, timeout_s=240)
    pids_after: dict[str, Any] = {
        n: ray.get(ray.get_actor(n, namespace=p.settings.ray_namespace).where.remote())
        for n in after
    }
    same = sorted(n for n in pids_before if pids_before[n] == pids_after.get(n))
    report = {
        "drill": "gcs_restart",
        "gcs_down_s": 5.0,
        "names_resolve_after_s": round(back_s, 1),
        "actors_same_process": f"{len(same)} of {len(pids_before)}",
        "messages": audit.messages,
        "lost": audit.lost,
        "reordered": audit.reordered_users,
        "duplicated_side_effects": audit.duplicated_side_effects,
        "handler_reruns": audit.handler_reruns,
    }
    print(f"\nmultinode drill: {json.dumps(report)}")
    assert set(after) >= set(before)

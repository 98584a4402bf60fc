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
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.devstack.pipeline import LocalPipeline
from qywx_ray.devstack.procs import stop_pidfile, wait_until
from qywx_ray.devstack.raycluster import LocalRayCluster, stop_ray_under, stop_recorded
from qywx_ray.devstack.redis import RedisServer
from qywx_ray.placement import actor_options, where
from tests.drills.conftest import RECORD_KEY, finish
from tests.drills.test_long_drills import Chatter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# Spread, and enough actors of each kind that every node holds some. The user hosts need
# `qywx_worker` (offered by every worker node, not the head): the node-loss drill always
# has hosts to lose, and after the loss they can only move to the other worker.
MULTINODE = {
    "placement": {"strategy": "SPREAD", "resources": {"user_host": {"qywx_worker": 1.0}}},
    "consume": {"num_consumers": 2, "num_hosts": 2},
    "ingest": {"num_syncer_hosts": 2},
}
EXPECTED_ROLES = ("consumer-", "user-host-", "syncer-host-", "drill-rec-")
# A node is declared dead after 3 missed 1 s health checks instead of Ray's default
# (5 x 3 s): the drill measures our recovery, not Ray's detection delay, which is
# reported apart (`node_dead_after_s`).
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def _placed(p: LocalPipeline, avoid: str | None = None, timeout_s: float = 120.0) -> dict:
    """Every named actor of the pipeline -> node id, once all of them answer (and none
    from `avoid`, a removed node)."""
    seen: dict[str, str | None] = {}

    def ready() -> bool:
        seen.clear()
        seen.update(p.actor_nodes(timeout_s=5.0))
        roles_ok = all(any(r in n for n in seen) for r in EXPECTED_ROLES)
        return roles_ok and all(v is not None and v != avoid for v in seen.values())

    wait_until(ready, timeout_s=timeout_s, what="every pipeline actor answering", interval_s=0.5)
    return dict(seen)


def _class_names() -> dict[str, str]:
    """Live actor name -> class name as the dashboard shows it (GCS actor table)."""
    from ray._private.state import actors

    return {
        str(a.get("Name")): str(a.get("ActorClassName"))
        for a in actors(actor_state_name="ALIVE").values()
        if a.get("Name")
    }


def _new_placements_use(p: LocalPipeline, node_id: str, n: int = 6) -> int:
    """How many of `n` new actors, placed like the pipeline's user hosts, land on `node_id`."""
    import ray

    @ray.remote(num_cpus=0)
    class Probe:
        def where(self) -> dict[str, Any]:
            return where()

    assert p.settings is not None
    opts = actor_options(p.settings.placement, "user_host")
    probes = [Probe.options(**opts).remote() for _ in range(n)]  # type: ignore[attr-defined]
    try:
        nodes = ray.get([x.where.remote() for x in probes], timeout=120)
    finally:
        for x in probes:
            ray.kill(x)
    return sum(1 for w in nodes if w["node_id"] == node_id)


def _node_loss(
    p: LocalPipeline,
    cluster: LocalRayCluster,
    users: int,
    before_s: float,
    after_s: float,
    add_back: bool,
) -> dict[str, Any]:
    names = cluster.node_names()
    with Chatter(p, ["wkN1", "wkN2"], users=users) as chatter:
        time.sleep(before_s)  # customers chat on the healthy cluster first
        placed = _placed(p)
        per_node = Counter(placed.values())
        workers = [nid for nid, name in names.items() if name != "head"]
        victim_id = max(workers, key=lambda nid: per_node.get(nid, 0))
        moved = sorted(a for a, nid in placed.items() if nid == victim_id)
        assert moved, f"no pipeline actor on a worker node: {placed}"
        assert len(per_node) >= 2, f"nothing spread: {placed}"
        t0 = time.monotonic()
        victim = names[victim_id]
        cluster.remove_worker(victim)
        cluster.wait_node_dead(victim_id)
        detected_s = time.monotonic() - t0
        after = _placed(p, avoid=victim_id)
        recovered_s = time.monotonic() - t0
        time.sleep(after_s)  # and keep chatting on the survivors
    client = p.redis_client()
    t_drain = time.monotonic()
    audit = finish(p, chatter.total, timeout_s=240)
    calls = [x.decode() for x in client.lrange(f"{RECORD_KEY}:calls", 0, -1)]
    # What an operator sees: `qywx-ray users` / `/admin/users` and `qywx-ray doctor`.
    from qywx_ray.consume.introspect import list_users
    from qywx_ray.doctor import _ray_check

    assert p.settings is not None
    view = list_users(p.settings)
    assert view["hosts"], view["hosts"]
    assert all(h["node"] != "?" for h in view["hosts"]), view["hosts"]
    checks = {c.name: c for c in _ray_check(None, 10.0, p.settings.ray_namespace)}
    assert checks["ray.actors"].ok, checks["ray.actors"]
    print(f"doctor: {checks['ray.actors'].detail}")
    report: dict[str, Any] = {
        "drill": "node_loss",
        "nodes": 3,
        "removed": victim,
        "actors_on_removed_node": moved,
        "placement_before": {a: names.get(n or "", "?") for a, n in placed.items()},
        "placement_after": {a: names.get(n or "", "?") for a, n in after.items()},
        "node_dead_after_s": round(detected_s, 1),
        "actors_back_after_s": round(recovered_s, 1),
        "drain_after_chat_s": round(time.monotonic() - t_drain, 1),
        "messages": audit.messages,
        "lost": audit.lost,
        "reordered": audit.reordered_users,
        "duplicated_side_effects": audit.duplicated_side_effects,
        "handler_reruns": audit.handler_reruns,
        "extra_handler_calls": len(calls) - len(set(calls)),
    }
    on_new = -1
    if add_back:
        new_node = cluster.add_worker()
        new_id = next(nid for nid, name in cluster.node_names().items() if name == new_node)
        on_new = _new_placements_use(p, new_id)
        report.update(new_node=new_node, new_placements_on_new_node=f"{on_new} of 6")
    print(f"\nmultinode drill: {json.dumps(report)}")
    assert all(n != victim_id for n in after.values())
    assert on_new != 0, "the node added back received none of 6 new placements"
    class_names = _class_names()
    assert not [c for c in class_names.values() if "<locals>" in c], class_names
    return report


@pytest.mark.slow
def test_node_loss_short(
    ray_cluster_factory: Callable[..., LocalRayCluster],
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    cluster = ray_cluster_factory(nodes=3, system_config=FAST_NODE_DEATH)
    p = pipeline_factory(overrides=MULTINODE)
    _node_loss(p, cluster, users=3, before_s=2.0, after_s=1.0, add_back=False)


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
    _node_loss(p, cluster, users=8, before_s=8.0, after_s=10.0, add_back=True)


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
        after = _placed(p)
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

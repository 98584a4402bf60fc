"""The multi-node drills' node-loss scenario, shared by the in-process drill
(tests/drills/test_multinode_drills.py) and its own-process form (multinode_child.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from qywx_ray.devstack.pipeline import RECORD_KEY, LocalPipeline
from qywx_ray.devstack.procs import wait_until
from qywx_ray.devstack.raycluster import LocalRayCluster
from qywx_ray.placement import actor_options, where
from tests.helpers.drills import Chatter, finish

EXPECTED_ROLES = ("consumer-", "user-host-", "syncer-host-", "drill-rec-")


# Spread, and enough actors of each kind that every node holds some. The user hosts need
# `qywx_worker` (offered by every worker node, not the head): the node-loss drill always
# has hosts to lose, and after the loss they can only move to the other worker.
MULTINODE = {
    "placement": {"strategy": "SPREAD", "resources": {"user_host": {"qywx_worker": 1.0}}},
    "consume": {"num_consumers": 2, "num_hosts": 2},
    "ingest": {"num_syncer_hosts": 2},
}


# A node is declared dead after 3 missed 1 s health checks instead of Ray's default
# (5 x 3 s): the drill measures our recovery, not Ray's detection delay, which is
# reported apart (`node_dead_after_s`).
FAST_NODE_DEATH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


def actors_placed(p: LocalPipeline, avoid: str | None = None, timeout_s: float = 120.0) -> dict:
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


def node_loss(
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
        placed = actors_placed(p)
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
        after = actors_placed(p, avoid=victim_id)
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

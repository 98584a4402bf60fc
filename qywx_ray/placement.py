"""Where our actors run: Ray placement options per role, and which node each one is on.

Spreading is what makes a node loss take only its share. With `placement.strategy:
SPREAD` Ray puts the partition consumers, user hosts, syncer hosts and the DLQ recovery
actor on different nodes when it can, and an actor whose node dies (every one of ours is
named, detached, `max_restarts=-1`) is restarted on any live node. Custom resources
(`placement.resources`) are hard constraints: an actor asking for `{"qywx_worker": 0.01}`
runs only where a node offers `qywx_worker`, so after a node loss it comes back only if
another node offers it too. Nothing here pins an actor to a node id: an id dies with its
node, and a pinned actor could never come back.

`where()` is what each actor reports about itself (node id, pid); `actor_nodes` asks every
named actor of a namespace and joins the answers with `ray.nodes()`, without needing the
dashboard (tests and `qywx-ray doctor` run without it).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["consumer", "user_host", "dedicated_user", "syncer_host", "dlq_recovery"]
ROLES: tuple[Role, ...] = ("consumer", "user_host", "dedicated_user", "syncer_host", "dlq_recovery")


class PlacementSettings(BaseModel):
    """`DEFAULT` is Ray's own choice (packs onto the node with room: on one node nothing
    changes); `SPREAD` spreads each role's actors over the live nodes (production)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["DEFAULT", "SPREAD"] = "DEFAULT"
    # Per role, custom resources each of its actors needs (e.g. {"user_host":
    # {"qywx_worker": 0.01}}): a node offers them with `ray start --resources`.
    resources: dict[Role, dict[str, float]] = {}


def actor_options(placement: PlacementSettings, role: Role) -> dict[str, Any]:
    """Extra `.options(...)` for an actor of `role` (empty with the defaults)."""
    opts: dict[str, Any] = {}
    if placement.strategy != "DEFAULT":
        opts["scheduling_strategy"] = placement.strategy
    wanted = placement.resources.get(role)
    if wanted:
        opts["resources"] = dict(wanted)
    return opts


def where() -> dict[str, Any]:
    """Called inside an actor: the node it runs on and its process."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def node_labels() -> dict[str, str]:
    """Live node id -> a short readable label: `<id[:8]> <ip> [head] <custom resources>`."""
    import ray

    out = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        custom = sorted(
            k
            for k in res
            if k not in ("CPU", "GPU", "memory", "object_store_memory")
            and not k.startswith("node:")
            and not k.startswith("accelerator_type:")
        )
        head = " head" if "node:__internal_head__" in res else ""
        nid = str(node["NodeID"])
        out[nid] = f"{nid[:8]} {node.get('NodeManagerAddress', '?')}{head} {','.join(custom)}"
    return {k: v.rstrip() for k, v in out.items()}


def actor_nodes(namespace: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every named actor of `namespace` that answers `where()` within the timeout:
    name, node id, node label, pid (`node_id` None for one that did not answer)."""
    import ray
    from ray.util import list_named_actors

    names = sorted(
        str(a["name"])
        for a in list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace
    )
    refs: dict[str, Any] = {}
    for name in names:
        try:
            refs[name] = ray.get_actor(name, namespace=namespace).where.remote()
        except (ValueError, AttributeError):  # gone meanwhile, or not one of ours
            continue
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    labels = node_labels()
    rows = []
    for name, ref in refs.items():
        info: dict[str, Any] = {"node_id": None, "pid": None}
        if ref in done:
            with contextlib.suppress(Exception):  # an actor restarting or ending right now
                info = ray.get(ref, timeout=0)
        nid = info["node_id"]
        rows.append(
            {
                "name": name,
                "node_id": nid,
                "node": labels.get(nid, "?") if nid else "no answer",
                "pid": info["pid"],
            }
        )
    return rows


def format_actor_nodes(rows: list[dict[str, Any]]) -> str:
    """One line per node: its label and the actors on it."""
    by_node: dict[str, list[str]] = {}
    for row in rows:
        by_node.setdefault(row["node"], []).append(row["name"])
    return "; ".join(f"{node}: {', '.join(names)}" for node, names in sorted(by_node.items()))

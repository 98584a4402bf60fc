"""Read-only views of live user actors (hosted mailboxes and dedicated actors).

Used by `GET /admin/users` and `qywx-ray users`. Needs a connected Ray driver; asks
each host/actor for a snapshot with a bounded timeout and never changes anything.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from qywx_ray.consume.hosts import host_name
from qywx_ray.consume.pipeline import user_actor_names
from qywx_ray.placement import node_labels
from qywx_ray.settings import Settings


def _rows(snap: dict[str, Any], now_s: float, node: str) -> list[dict[str, Any]]:
    rows = []
    for mb in snap.get("mailboxes", []):
        rows.append(
            {
                "user": mb["user"],
                "mode": snap.get("mode", "hosted"),
                "host": snap["host"],
                "node": node,
                "state": mb["state"],
                "queue_depth": mb["queue_depth"],
                "busy": mb["busy"],
                "last_active": round(now_s - mb["idle_s"], 3),
                "processed": mb["processed"],
            }
        )
    return rows


def list_users(
    settings: Settings, *, limit: int = 1000, user: str | None = None, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Live users across hosts and dedicated actors, plus a per-host summary."""
    ns = settings.consume.namespace
    handles: list[Any] = []
    missing: list[str] = []
    names = [host_name(settings, i) for i in range(settings.consume.num_hosts)]
    names += user_actor_names(ns)
    for name in names:
        try:
            handles.append(ray.get_actor(name, namespace=ns))
        except ValueError:
            missing.append(name)
    refs = [h.snapshot.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    now = time.time()
    users: list[dict[str, Any]] = []
    hosts: list[dict[str, Any]] = []
    labels = node_labels()
    for ref in ready:
        try:
            snap = ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - an actor ending itself right now
            continue
        keys = ("host", "mode", "users", "pending", "counts", "pid", "redis_ok", "node_id")
        summary = {k: snap.get(k) for k in keys}
        summary["node"] = labels.get(str(snap.get("node_id")), "?")
        hosts.append(summary)
        users.extend(
            r for r in _rows(snap, now, summary["node"]) if user is None or r["user"] == user
        )
    users.sort(key=lambda r: r["last_active"], reverse=True)
    return {"users": users[:limit], "total": len(users), "hosts": hosts, "missing": missing}


def format_users(view: dict[str, Any]) -> str:
    """Plain-text table for the CLI."""
    lines = [f"{'USER':<32} {'MODE':<9} {'STATE':<6} {'QUEUE':>5} {'IDLE_S':>8}  HOST  NODE"]
    now = time.time()
    for r in view["users"]:
        lines.append(
            f"{r['user'][:32]:<32} {r['mode']:<9} {r['state']:<6} {r['queue_depth']:>5} "
            f"{now - r['last_active']:>8.1f}  {r['host']}  {str(r.get('node', '?'))[:8]}"
        )
    lines.append(f"{view['total']} live user(s) on {len(view['hosts'])} host(s)")
    for h in view["hosts"]:
        lines.append(f"  host {h['host']}: {h.get('users')} user(s) on node {h.get('node', '?')}")
    return "\n".join(lines)


def users_command(settings: Settings, *, as_json: bool = False, limit: int = 100) -> str:
    """What `qywx-ray users` prints (the caller connects to Ray first)."""
    import json

    view = list_users(settings, limit=limit)
    return json.dumps(view, ensure_ascii=False, indent=2) if as_json else format_users(view)

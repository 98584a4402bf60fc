"""Drill fixtures: the whole pipeline (own Kafka/Redis, simulator, Serve, consumers, DLQ)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.devstack.pipeline import RECORD_KEY, AuditResult, LocalPipeline
from qywx_ray.devstack.raycluster import LocalRayCluster
from qywx_ray.settings import _deep_merge

# The drills chat at machine speed (10 messages per customer in a few seconds), far above
# the seed's 5 per 10 s: with the seed rule they would test the rate limiter, not the
# faults they inject. The limiter still runs on every batch, with a rule sized to them.
DRILL_PROTECT = {
    "protect": {
        "default": {
            "window_seconds": 10,
            "max_messages": 1000,
            "penalty_threshold": 1000,
            "block_hours": 0.0,
        }
    }
}


@pytest.fixture
def ray_cluster_factory(ray_session: None) -> Iterator[Callable[..., LocalRayCluster]]:
    """A head plus worker nodes (each its own raylet, 1 CPU) instead of the session's
    one-node Ray, for the multi-node drills; the session's Ray is back afterwards.
    Request it before `pipeline_factory`, so the pipeline stops while its cluster runs."""
    import ray

    from tests.conftest import init_local_ray

    started: list[LocalRayCluster] = []

    def start(**kw: Any) -> LocalRayCluster:
        assert not started, "one cluster per test"
        ray.shutdown()
        cluster = LocalRayCluster(**kw)
        started.append(cluster)
        cluster.start()
        ray.init(
            address=cluster.address,
            namespace="qywx-test",
            log_to_driver=False,
            configure_logging=False,
        )
        return cluster

    yield start
    if started:
        ray.shutdown()
        started[0].shutdown()
        init_local_ray()


@pytest.fixture
def pipeline_factory(ray_session: None, tmp_path: Path) -> Iterator[Callable[..., LocalPipeline]]:
    started: list[LocalPipeline] = []

    def start(**kw: Any) -> LocalPipeline:
        # The recovery actor is named in the driver's namespace, which LocalPipeline.stop
        # does not clean: a fixed name would hand the next drill the previous drill's
        # actor (reading a Kafka that is gone), so its dead letters would never be indexed.
        rec = {"dlq": {"recovery_actor_name": f"drill-rec-{uuid.uuid4().hex[:8]}"}}
        kw["overrides"] = _deep_merge(_deep_merge(DRILL_PROTECT, rec), kw.get("overrides", {}))
        p = LocalPipeline(tmp_path / f"p{len(started)}", **kw)
        started.append(p)
        return p.start()

    yield start
    import ray

    for p in started:
        p.stop()
        if p.settings is not None:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(p.settings.dlq.recovery_actor_name), no_restart=True)
    if started:
        # LocalPipeline.stop deletes its app but leaves Serve's proxy on ITS port; the
        # next drill's pipeline would then listen on the old port while its simulator
        # calls the new one (callbacks refused, kfids never learned, the drill hangs).
        from ray import serve

        serve.shutdown()


def chat(
    p: LocalPipeline, kfids: list[str], users: int, rounds: int, per_round: int = 2, **kw: Any
) -> int:
    """Customers chat in interleaved rounds, so per-user order is meaningful."""
    assert p.sim is not None
    total = 0
    for _ in range(rounds):
        for kfid in kfids:
            for u in range(users):
                p.sim.inject(kfid, f"{kfid}-u{u}", per_round, **kw)
                total += per_round
    return total


def finish(
    p: LocalPipeline, expected: int, timeout_s: float = 120.0, processed: int | None = None
) -> AuditResult:
    p.wait_drained(expected, timeout_s=timeout_s, processed=processed)
    result = p.audit()
    print(f"\ndrill audit: {result.line()}")
    if not result.ok:
        print(evidence(p))
    assert result.ok, result.details[:10]
    return result


def evidence(p: LocalPipeline) -> str:
    """What a failed audit needs to be diagnosed: per user, the order in which side
    effects were recorded and the handler calls, as positions in the simulator's truth
    (e.g. `0 1 3 2`), plus where Ray keeps the workers' logs."""
    assert p.sim is not None
    client = p.redis_client()
    truth = p.sim.truth()
    records = [x.decode().partition("|") for x in client.lrange(RECORD_KEY, 0, -1)]
    calls = [x.decode().partition("|") for x in client.lrange(f"{RECORD_KEY}:calls", 0, -1)]
    lines = []
    for users in truth.values():
        for user, ids in users.items():
            pos = {m: i for i, m in enumerate(ids)}
            got = [pos.get(m, -1) for u, _, m in records if u == user]
            called = [pos.get(m, -1) for u, _, m in calls if u == user]
            if got != sorted(got) or len(called) != len(set(called)) or len(got) < len(ids):
                lines.append(f"user {user} ({len(ids)} msgs)")
                lines.append(f"  effects: {' '.join(map(str, got))}")
                lines.append(f"  calls:   {' '.join(map(str, called))}")
    try:
        from ray._private.worker import global_worker

        node: Any = global_worker.node
        lines.append(f"ray logs: {node.get_session_dir_path()}/logs")
    except Exception as exc:  # evidence is best effort; the audit already failed
        lines.append(f"ray logs: unknown ({exc!r})")
    return "\n".join(["drill evidence:", *lines])

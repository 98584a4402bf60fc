"""Drill fixtures: the whole pipeline (own Kafka/Redis, simulator, Serve, consumers, DLQ)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.devstack.pipeline import AuditResult, LocalPipeline
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
    assert result.ok, result.details[:10]
    return result

"""Drill fixtures: the whole pipeline (own Kafka/Redis, simulator, Serve, consumers, DLQ)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.devstack.pipeline import LocalPipeline
from qywx_ray.devstack.raycluster import LocalRayCluster
from qywx_ray.settings import _deep_merge
from tests.helpers.drills import DRILL_PROTECT


@pytest.fixture
def ray_cluster_factory(ray_session: None) -> Iterator[Callable[..., LocalRayCluster]]:
    """A head plus worker nodes (each its own raylet, 1 CPU) instead of the session's
    one-node Ray, for the multi-node drills; the session's Ray is back afterwards.
    Request it before `pipeline_factory`, so the pipeline stops while its cluster runs."""
    import ray

    from tests.helpers.ray import init_local_ray

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

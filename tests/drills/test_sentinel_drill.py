"""Drill: Redis Sentinel fails the master over while customers chat (`make drills`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qywx_ray.devstack.pipeline import LocalPipeline
from tests.drills.conftest import finish
from tests.drills.test_long_drills import Chatter

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.xfail(
    strict=False,
    reason="open (issue 8/9): after a Sentinel failover mid-stream, handlers whose Redis "
    "calls fail go to the DLQ as downstream_error and the drill did not drain within its "
    "240 s bound in the one run we made; the clients follow the new master (same pipeline "
    "without failover drains in ~2 s). Root cause not yet established.",
)
def test_sentinel_failover_mid_stream(
    pipeline_factory: Callable[..., LocalPipeline], tmp_path: Path
) -> None:
    from qywx_ray.devstack.sentinel import SentinelCluster

    with SentinelCluster(tmp_path / "sentinel") as cluster:
        sentinel = {
            "redis": {
                "mode": "sentinel",
                "master_name": cluster.master_name,
                "sentinel_addrs": cluster.sentinel_addrs,
            }
        }
        p = pipeline_factory(redis_url="sentinel", overrides=sentinel)
        with Chatter(p, ["wkS1", "wkS2"], users=6) as chatter:
            time.sleep(5)
            cluster.failover()
            time.sleep(8)
        finish(p, chatter.total, timeout_s=240)

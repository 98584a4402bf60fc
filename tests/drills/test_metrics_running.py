"""The running pipeline's metrics, as Prometheus scrapes them from Ray's exporter.

One pipeline run (callbacks → sync → Kafka → consumers → handler, plus a poison record
and a permanently failing message for the DLQ path), then the node's metrics endpoint must
show each stage's metric with a value that matches what happened. Metrics that need a
fault to move (emergency writes, spool, blocks) are covered by their own tests.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable

import pytest
import ray

from qywx_ray.devstack.pipeline import LocalPipeline
from tests.helpers.drills import chat, finish

pytestmark = pytest.mark.integration


def _scrape() -> dict[str, float]:
    """Sum of every series per metric name (Ray adds WorkerId etc. labels)."""
    port = int(ray.nodes()[0]["MetricsExportPort"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_qywx_\w+?)(\{.*\})? ([0-9.eE+-]+)$", line)
        if m:
            totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(3))
    return totals


def test_each_stage_exports_its_metrics(pipeline_factory: Callable[..., LocalPipeline]) -> None:
    p = pipeline_factory()
    assert p.sim is not None
    total = chat(p, ["wkM"], users=5, rounds=4)
    p.sim.inject("wkM", "wkM-u0", 1, extra={"fail": "permanent"})
    finish(p, total + 1)
    expected_at_least = {
        "ray_qywx_callbacks_total": 1,
        "ray_qywx_sync_pulls_total": 1,
        "ray_qywx_sync_messages_total": total + 1,
        "ray_qywx_produced_total": total + 1,
        "ray_qywx_produce_latency_seconds_count": total + 1,
        "ray_qywx_lock_acquired_total": 1,
        "ray_qywx_messages_consumed_total": total + 1,
        "ray_qywx_messages_processed_total": total,
        "ray_qywx_processing_seconds_count": total,
        "ray_qywx_commits_total": 1,
        "ray_qywx_dlq_messages_produced_total": 1,
        "ray_qywx_handler_failures_total": 1,
    }
    deadline = time.monotonic() + 60  # Ray's agent exports on a ~5-10 s cycle
    while True:
        seen = _scrape()
        short = {k: (seen.get(k), v) for k, v in expected_at_least.items() if seen.get(k, 0) < v}
        if not short or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not short, f"metric: (scraped, expected at least) {short}"
    # Nothing failed that should not have: no Kafka failures, no emergency writes.
    assert seen.get("ray_qywx_kafka_failures_total", 0) == 0
    assert seen.get("ray_qywx_dlq_emergency_writes_total", 0) == 0

"""bench_kafka_ceiling in quick mode against the test broker: every case measures, cleans up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _topics(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    return set(admin.list_topics(timeout=10).topics)


@pytest.mark.timeout(120)
def test_quick_ceiling_emits_positive_figures_for_every_case(kafka_bootstrap: str) -> None:
    from bench.kafka_tools import kafka_tools_available

    env = {
        **os.environ,
        "QYWX_BENCH_QUICK": "1",
        "QYWX_BENCH_BOOTSTRAP": kafka_bootstrap,
        "QYWX_BENCH_RUN_ID": "itest",
    }
    env.pop("QYWX_BENCH_RUNS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_kafka_ceiling", "--records", "10000"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0]["kind"] == "machine"
    assert lines[0]["nproc"] >= 1
    measurements = [x for x in lines if x["kind"] == "measurement"]
    assert all(x["run"] == 0 and x["run_id"] == "itest" for x in measurements)  # quick: 1 run
    assert all(x["record_size"] == 1024 and x["mode"] == "quick" for x in measurements)
    by_case: dict[str, dict[str, float]] = {}
    for x in measurements:
        assert x["value"] > 0, x
        by_case.setdefault(x["case"], {})[x["metric"]] = x["value"]
    expected = {"raw_produce", "raw_consume"}
    if kafka_tools_available():
        expected |= {"kafka_perf_produce", "kafka_perf_consume"}
    assert set(by_case) == expected
    for case in expected:
        assert by_case[case]["throughput"] > 0
        assert by_case[case]["throughput_bytes"] > 0
    for case in expected & {"raw_produce", "kafka_perf_produce"}:
        figures = by_case[case]
        assert 0 < figures["latency_p50"] <= figures["latency_p99"] <= figures["latency_max"]
    # The bench deleted the topics it created on the shared broker (metadata may lag).
    [main_topic] = {x["extra"]["topic"] for x in measurements}
    assert main_topic.startswith("bench-main-")
    mine = {main_topic, main_topic.replace("bench-main-", "bench-dlq-", 1)}
    deadline = time.monotonic() + 20
    while mine & _topics(kafka_bootstrap) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not mine & _topics(kafka_bootstrap)

"""The CLI's exit codes and messages for bad configuration (nothing half-written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "qywx_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_production_profile_on_one_broker_exits_2(kafka_bootstrap: str) -> None:
    result = _run(
        ["--profile", "production", "topics", "ensure"],
        {"QYWX_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "QYWX_KAFKA__MAIN_TOPIC__NAME": "cli-x"},
    )
    assert result.returncode == 2, result.stderr
    assert "replication_factor=3 but only 1 broker(s) are live" in result.stderr
    assert "nothing was changed" in result.stderr


def test_bad_yaml_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("consume:\n  num_consumers: -1\n")
    result = _run(["--config", str(cfg), "topics", "ensure"], {})
    assert result.returncode == 2
    assert "consume.num_consumers" in result.stderr


def test_unreachable_kafka_exits_3(tmp_path: Path) -> None:
    from qywx_ray.devstack.procs import free_port

    result = _run(
        ["topics", "ensure", "--timeout-s", "3"],
        {"QYWX_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
    )
    assert result.returncode == 3, result.stderr
    assert "cannot reach Kafka" in result.stderr

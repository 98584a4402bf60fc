"""The CLI's exit codes and messages for bad configuration (nothing half-written)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


# Non-default credentials, so a production-profile test reaches the check it is about.
REAL_SECRETS = {
    "QYWX_ADMIN__TOKEN": "k7Vq2mXr9TbL4wPz8NcY",
    "QYWX_WECOM__CORP_ID": "ww0123456789abcdef",
    "QYWX_WECOM__TOKEN": "T0ken123abc",
    "QYWX_WECOM__ENCODING_AES_KEY": "Q" * 43,
    "QYWX_WECOM__KF_SECRET": "s3cr3tValue99",
}


def _run(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QYWX_")}
    env = {**clean, **env_extra}
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
        {
            **REAL_SECRETS,
            "QYWX_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
            "QYWX_KAFKA__MAIN_TOPIC__NAME": "cli-x",
        },
    )
    assert result.returncode == 2, result.stderr
    assert "replication_factor=3 but only 1 broker(s) are live" in result.stderr
    assert "nothing was changed" in result.stderr


def test_production_profile_with_the_default_admin_token_exits_2(tmp_path: Path) -> None:
    """Refused while loading the settings: before any broker is contacted (this one would
    give exit 3), and with the field named but not its value."""
    from qywx_ray.devstack.procs import free_port

    secrets = {k: v for k, v in REAL_SECRETS.items() if k != "QYWX_ADMIN__TOKEN"}
    result = _run(
        ["--profile", "production", "topics", "ensure", "--timeout-s", "3"],
        {**secrets, "QYWX_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
    )
    assert result.returncode == 2, result.stderr
    assert "admin.token (QYWX_ADMIN__TOKEN): the built-in default" in result.stderr
    assert "wecom." not in result.stderr
    assert "change-me-admin-token" not in result.stderr


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


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (kernel hex) in LISTEN state on `port`, from /proc/net."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.add(addr)
    return found


def test_admin_serve_listens_on_loopback_with_admin_routes_only(tmp_path: Path) -> None:
    """`qywx-ray admin serve` (README, SECURITY.md): 127.0.0.1 by default, bearer token
    required, no callback route; stopped by its PID at the end."""
    import httpx

    from qywx_ray.devstack.procs import free_port
    from tests.helpers.wait import wait_until

    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QYWX_")}
    cmd = ["admin", "serve", "--port", str(port), "--address", ""]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qywx_ray.cli", *cmd],
        env={**clean, "QYWX_DATA_DIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        answers: list[httpx.Response] = []

        def answered() -> bool:  # readiness: the first answer, not a fixed sleep
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(httpx.TransportError):
                answers.append(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0))
            return bool(answers)

        wait_until(answered, timeout_s=60, what="admin serve to answer /healthz")
        assert answers[0].status_code == 200
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/admin/dlq/stats").status_code == 401
        bad = {"Authorization": "Bearer wrong-token"}
        assert httpx.get(f"{base}/admin/dlq/stats", headers=bad).status_code == 401
        assert httpx.post(f"{base}/wecom/callback", content=b"x").status_code == 404
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)

"""Documented commands run: every `<!-- run: quick -->` shell block of README.md and docs/
runs here (make test), every `<!-- run: slow -->` one under make drills.

A block runs as written, in bash with `set -euo pipefail`, in a fresh directory, with
`qywx-ray` meaning this checkout's CLI and `QYWX_DATA_DIR` in that directory, so whatever
it starts lives there and is stopped by PID afterwards even when the block fails. The
local stack's ports are fixed (Kafka 9092-9097, Redis 6379): when something else holds
them the block is skipped, never run against someone else's services.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qywx_ray.devstack.local import DEV_KAFKA_PORTS, DEV_REDIS_PORT, LocalStack
from qywx_ray.devstack.procs import port_open
from tests.helpers.docs import REPO, ShellBlock, shell_blocks

pytestmark = pytest.mark.integration

FIXED_PORTS = sorted({*DEV_KAFKA_PORTS[3], *(p + 1 for p in DEV_KAFKA_PORTS[3]), DEV_REDIS_PORT})


def _cases() -> list[object]:
    cases: list[object] = []
    for block in shell_blocks():
        if block.kind == "quick":
            cases.append(pytest.param(block, id=block.id))
        elif block.kind == "slow":
            cases.append(pytest.param(block, id=block.id, marks=pytest.mark.slow))
    return cases


def test_the_readme_has_a_runnable_block() -> None:
    assert any(b.kind == "quick" and b.path.name == "README.md" for b in shell_blocks())


@pytest.mark.parametrize("block", _cases())
def test_documented_block_runs(block: ShellBlock, tmp_path: Path) -> None:
    busy = [p for p in FIXED_PORTS if port_open(p)]
    if busy:
        pytest.skip(f"ports {busy} are held by something else on this machine")
    shim = tmp_path / "bin"
    shim.mkdir()
    cli = shim / "qywx-ray"
    cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qywx_ray.cli "$@"\n')
    cli.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "QYWX_DATA_DIR": str(work / ".qywx-data"),
    }
    stack = LocalStack(work / ".qywx-data" / "dev")
    try:
        out = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + block.code],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        left_running = [name for name, alive in stack.status().items() if alive]
    finally:
        stack.down()  # by PID, whatever the block did
    assert out.returncode == 0, f"{block.id} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    assert not left_running, f"the block left {left_running} running"

"""devstack.procs: a harness's services end with it even when its cleanup never runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qywx_ray.devstack.procs import pid_alive

# A harness that starts a long `sleep` as a service, prints its PID, then waits to be killed.
# The kernel ties PR_SET_PDEATHSIG to the starting thread, so only main-thread starts use it.
HARNESS = """
import sys, threading, time
from pathlib import Path
from qywx_ray.devstack import procs
mode = sys.argv[2]
if mode != "default":
    procs.die_with_parent()
service = procs.ManagedProcess("svc", ["sleep", "300"], Path(sys.argv[1]))
if mode == "from_a_thread":  # a thread that starts it and ends
    starter = threading.Thread(target=service.start)
    starter.start()
    starter.join()
else:
    service.start()
print(service.pid, flush=True)
time.sleep(300)
"""


def _start_harness(workdir: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    harness = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(workdir), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert harness.stdout is not None
    line = harness.stdout.readline()  # bounded: the harness prints at once or exits
    assert line.strip().isdigit(), f"harness printed {line!r}"
    return harness, int(line)


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", ["die_with_parent", "default"])
def test_a_service_ends_with_a_harness_killed_9_only_when_asked(tmp_path: Path, mode: str) -> None:
    harness, service = _start_harness(tmp_path, mode)
    try:
        assert pid_alive(service)
        harness.kill()  # SIGKILL: no cleanup of its own runs
        harness.wait(timeout=10)
        if mode == "die_with_parent":
            assert _gone_within(service, 10.0), "the kernel did not end the service"
        else:  # `qywx-ray dev up`'s services must outlive the command that started them
            assert not _gone_within(service, 0.5)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(timeout=10)
        if pid_alive(service):
            os.kill(service, signal.SIGKILL)
        assert _gone_within(service, 10.0)


def test_a_service_started_from_a_thread_outlives_that_thread(tmp_path: Path) -> None:
    harness, service = _start_harness(tmp_path, "from_a_thread")
    try:
        assert not _gone_within(service, 0.5)  # the thread has ended; the service runs on
    finally:
        harness.kill()
        harness.wait(timeout=10)
        if pid_alive(service):
            os.kill(service, signal.SIGKILL)
        assert _gone_within(service, 10.0)

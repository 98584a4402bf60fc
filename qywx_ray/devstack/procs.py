"""Start and stop local service processes by PID, with bounded waits.

Every process is started in its own session so a stop can signal its whole group,
and its PID is written beside its data so `qywx-ray dev down` finds it again.

A harness (a benchmark) that must not leave services behind calls `die_with_parent()`
first: every process started after it gets SIGTERM from the kernel when the thread that
started it ends (Linux `PR_SET_PDEATHSIG`). Its own cleanup stops them by PID as before;
this covers the cases where that cleanup never runs (a kill -9, or an abort in Ray's
shutdown after SIGTERM: ray.init replaces Python's SIGTERM handler, and a bench stopped
by its harness's timeout left its Kafka and Redis running). Never for `qywx-ray dev up`,
whose services outlive the command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qywx_ray.errors import InfraError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_die_with_parent = False
_prctl: Callable[..., int] | None = None


def die_with_parent(on: bool = True) -> None:
    """Processes started from now on, from the main thread, end (SIGTERM) when it ends.
    The kernel ties a child to the thread that started it, so a start from another
    thread is left out: it would end with that thread, not with the process."""
    global _die_with_parent, _prctl
    if on and _prctl is None:
        import ctypes

        # Resolved here, in the parent: the child runs only the call between fork and exec.
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _die_with_parent = on


def _ends_with(parent_pid: int) -> Callable[[], None]:
    prctl = _prctl
    assert prctl is not None

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent ended before the call: end now
            os._exit(1)

    return in_child


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise InfraError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class ManagedProcess:
    """One child process, its log file and its pidfile."""

    def __init__(
        self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"
        self.pid_path = workdir / f"{name}.pid"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
                # only the prctl call runs between fork and exec (see die_with_parent)
                preexec_fn=_ends_with(os.getpid()) if self._dies_with_parent() else None,
            )
        except FileNotFoundError as exc:
            raise InfraError(f"{self.name}: cannot run {self.argv[0]}: {exc}") from exc
        finally:
            log.close()
        self.pid_path.write_text(str(self.proc.pid))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @staticmethod
    def _dies_with_parent() -> bool:
        return _die_with_parent and threading.current_thread() is threading.main_thread()

    def kill9(self) -> None:
        """Hard crash, as in a fault drill."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None:
            stop_pidfile(self.pid_path, timeout_s)
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.pid_path.unlink(missing_ok=True)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_pidfile(pid_path: Path, timeout_s: float = 15.0) -> bool:
    """Stop a process recorded in a pidfile by an earlier run; True if one was running."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return False
    was_running = pid_alive(pid)
    if was_running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    pid_path.unlink(missing_ok=True)
    return was_running


def kill_named_actors(namespace: str, prefixes: tuple[str, ...] = ("qywx-", "user:")) -> int:
    """Detached actors outlive their creator: whoever started them must remove them."""
    import ray
    from ray.util import list_named_actors

    killed = 0
    for entry in list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(prefixes):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)
                killed += 1
            except ValueError:
                pass
    return killed

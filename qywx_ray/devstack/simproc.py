"""The WeCom simulator as a separate process (for the demo, e2e tests and drills)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from qywx_ray.devstack.procs import ManagedProcess, free_port, port_open, wait_until


@dataclass
class SimulatorProcess:
    workdir: Path
    callback_url: str
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/cgi-bin"

    def start(self, timeout_s: float = 30.0) -> SimulatorProcess:
        argv = [
            sys.executable,
            "-m",
            "qywx_ray.testing.wecomsim",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--callback-url",
            self.callback_url,
            *self.extra_args,
        ]
        self.process = ManagedProcess(f"simulator-{self.port}", argv, self.workdir)
        self.process.start()

        def up() -> bool:
            if self.process is not None and not self.process.alive():
                raise RuntimeError(f"simulator exited:\n{self.process.tail()}")
            return port_open(self.port)

        wait_until(up, timeout_s=timeout_s, what="the WeCom simulator")
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def inject(self, open_kfid: str, user: str, count: int, **kw: Any) -> list[str]:
        r = httpx.post(
            f"{self.base_url}/sim/messages",
            json={"open_kfid": open_kfid, "external_userid": user, "count": count, **kw},
            timeout=30,
        )
        r.raise_for_status()
        return list(r.json()["msgids"])

    def truth(self) -> dict[str, dict[str, list[str]]]:
        r = httpx.get(f"{self.base_url}/sim/truth", timeout=30)
        r.raise_for_status()
        return dict(r.json()["messages"])

    def stats(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base_url}/sim/stats", timeout=10).json())

    def fault(self, **rule: Any) -> None:
        httpx.post(f"{self.base_url}/sim/faults", json=rule, timeout=10).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.base_url}/sim/faults", timeout=10).raise_for_status()

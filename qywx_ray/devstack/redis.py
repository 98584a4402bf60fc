"""A real redis-server on loopback (Debian package), AOF on, stopped by PID."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import redis

from qywx_ray.devstack.procs import ManagedProcess, free_port, port_open, wait_until
from qywx_ray.errors import InfraError


def redis_server_bin() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise InfraError(
            "redis-server is not installed: apt-get install redis-server "
            "(make setup does it for you)"
        )
    return path


@dataclass
class RedisServer:
    workdir: Path
    port: int = 0
    appendfsync: str = "everysec"
    process: ManagedProcess | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            redis_server_bin(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        if port_open(self.port):
            raise InfraError(f"port {self.port} is already in use: is another Redis running?")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess(f"redis-{self.port}", self.argv(), self.workdir)
        self.process.start()
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)

        def ready() -> bool:
            if self.process is not None and not self.process.alive():
                raise InfraError(f"redis-server exited during start:\n{self.process.tail()}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(ready, timeout_s=timeout_s, what=f"redis-server on port {self.port}")
        client.close()
        return self

    def kill9(self) -> None:
        if self.process:
            self.process.kill9()

    def stop(self) -> None:
        if self.process:
            self.process.stop()
        else:
            ManagedProcess(f"redis-{self.port}", [], self.workdir).stop()

"""The local stack `make demo` and `qywx-ray dev up` run: Kafka (1 or 3 brokers) + Redis.

Processes outlive the command that started them (own session, pidfile beside their
data in <data_dir>/dev), so `qywx-ray dev down` or Ctrl-C in the demo stops them by PID.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qywx_ray.devstack.kafka import KafkaCluster
from qywx_ray.devstack.procs import pid_alive, port_open, stop_pidfile
from qywx_ray.devstack.redis import RedisServer
from qywx_ray.errors import ConfigError

DEV_KAFKA_PORTS = {1: [9092], 3: [9092, 9094, 9096]}
DEV_REDIS_PORT = 6379


@dataclass
class LocalStack:
    root: Path
    brokers: int = 1

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in DEV_KAFKA_PORTS[self.brokers])

    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{DEV_REDIS_PORT}/0"

    def running(self) -> bool:
        return all(port_open(p) for p in DEV_KAFKA_PORTS[self.brokers]) and port_open(
            DEV_REDIS_PORT
        )

    def up(self, fresh: bool = False) -> list[str]:
        """Start what is not running; returns what was started.

        `fresh`: a service that has to be started starts from empty data."""
        started = []
        if fresh and not self.running():
            import shutil

            for sub in (f"kafka-{self.brokers}", "redis"):
                shutil.rmtree(self.root / sub, ignore_errors=True)
        if not all(port_open(p) for p in DEV_KAFKA_PORTS[self.brokers]):
            KafkaCluster(
                self.root / f"kafka-{self.brokers}",
                brokers=self.brokers,
                ports=DEV_KAFKA_PORTS[self.brokers],
                controller_ports=[p + 1 for p in DEV_KAFKA_PORTS[self.brokers]],
            ).start()
            started.append(f"kafka x{self.brokers} at {self.bootstrap()}")
        if not port_open(DEV_REDIS_PORT):
            RedisServer(self.root / "redis", port=DEV_REDIS_PORT).start()
            started.append(f"redis at {self.redis_url()}")
        self.state_file.write_text(json.dumps({"brokers": self.brokers}))
        return started

    def ray_up(self, nodes: int) -> str:
        """A head plus `nodes - 1` worker raylets on loopback, left running (stopped by
        PID in `down`); returns the cluster's address. Reuses a recorded running one."""
        from qywx_ray.devstack.raycluster import LocalRayCluster, recorded_cluster

        running = recorded_cluster(self.root)
        if running is not None:
            return str(running["address"])
        if nodes < 1:
            raise ConfigError("--ray-nodes must be at least 1 (the head)")
        cluster = LocalRayCluster(
            nodes=nodes, include_dashboard=True, persist=True, node_ip="127.0.0.1"
        ).start()
        cluster.record(self.root)
        return cluster.address

    def down(self) -> list[str]:
        from qywx_ray.devstack.raycluster import stop_recorded

        stopped = []
        if n := stop_recorded(self.root):
            stopped.append(f"ray cluster ({n} processes)")
        for pidfile in sorted(self.root.glob("**/*.pid")):
            if stop_pidfile(pidfile):
                stopped.append(pidfile.stem)
        return stopped

    def status(self) -> dict[str, bool]:
        out = {}
        for pidfile in sorted(self.root.glob("**/*.pid")):
            try:
                out[pidfile.stem] = pid_alive(int(pidfile.read_text()))
            except ValueError:
                out[pidfile.stem] = False
        return out

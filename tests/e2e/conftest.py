"""End-to-end fixtures: the WeCom simulator process and the Serve ingress on real Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer

from qywx_ray.devstack.procs import free_port, kill_named_actors
from qywx_ray.devstack.simproc import SimulatorProcess
from qywx_ray.envelope import Envelope
from qywx_ray.kafka.topics import ensure_topics
from qywx_ray.settings import Settings


@dataclass
class Ingress:
    settings: Settings
    sim: SimulatorProcess
    http_port: int

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/wecom/callback"


@pytest.fixture
def ingress_factory(
    ray_session: None, make_settings: Callable[..., Settings], tmp_path: Path, unique: str
) -> Iterator[Callable[..., Ingress]]:
    from ray import serve

    from qywx_ray.ingress.app import deployment

    started: list[Ingress] = []

    def start(**overrides: Any) -> Ingress:
        http_port = free_port()
        sim = SimulatorProcess(
            tmp_path / "sim",
            f"http://127.0.0.1:{http_port}/wecom/callback",
            extra_args=["--users", "0", "--callback-timeout-s", "2"],
        ).start()
        base: dict[str, Any] = {
            "wecom": {"api_base": sim.api_base},
            "consume": {"namespace": f"e2e-{unique}"},
            "ingest": {"sweep_interval_s": 2.0, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        }
        for key, value in overrides.items():
            base[key] = {**base.get(key, {}), **value}
        settings = make_settings(**base)
        ingress = Ingress(settings, sim, http_port)
        started.append(ingress)  # from here on, teardown stops the simulator
        ensure_topics(settings.kafka)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(deployment(settings), name=f"qywx-{unique}", route_prefix="/")
        return ingress

    yield start
    for ingress in started:
        ingress.sim.stop()
        serve.shutdown()
        kill_named_actors(ingress.settings.ray_namespace)


def read_topic(settings: Settings, expected: int, timeout_s: float = 60.0) -> dict[str, list[str]]:
    """Every envelope on the main topic, as message ids per user in partition order."""
    import time

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "group.id": f"reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.kafka.main_topic.name])
    per_user: dict[str, list[str]] = {}
    seen = 0
    deadline = time.monotonic() + timeout_s
    try:
        while seen < expected and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error():
                    continue
                env = Envelope.from_bytes(msg.value())
                assert msg.key() == env.key
                per_user.setdefault(env.external_userid, []).append(env.message_id)
                seen += 1
        # Give a little time for anything beyond `expected` (duplicates) to show up.
        for msg in consumer.consume(1000, timeout=1.0):
            if not msg.error():
                env = Envelope.from_bytes(msg.value())
                per_user.setdefault(env.external_userid, []).append(env.message_id)
    finally:
        consumer.close()
    return per_user

"""The end-to-end tests' ingress handle and topic reader (fixtures stay in tests/e2e/conftest.py).

Tests import from here, never from conftest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import Consumer

from qywx_ray.devstack.simproc import SimulatorProcess
from qywx_ray.envelope import Envelope
from qywx_ray.settings import Settings


@dataclass
class Ingress:
    settings: Settings
    sim: SimulatorProcess
    http_port: int

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/wecom/callback"


def read_topic(settings: Settings, expected: int, timeout_s: float = 60.0) -> dict[str, list[str]]:
    """Every envelope on the main topic, as message ids per user in partition order."""

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

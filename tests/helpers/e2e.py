"""The end-to-end tests' ingress handle and main-topic reader (fixtures: tests/e2e/conftest.py).

Tests import from here, never from conftest.
"""

from __future__ import annotations

from dataclasses import dataclass

from qywx_ray.devstack.simproc import SimulatorProcess
from qywx_ray.settings import Settings
from tests.helpers.kafka import ids_per_user, read_records


@dataclass
class Ingress:
    settings: Settings
    sim: SimulatorProcess
    http_port: int

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/wecom/callback"


def read_topic(settings: Settings, expected: int, timeout_s: float = 60.0) -> dict[str, list[str]]:
    """Every envelope on the main topic, as message ids per user in log order (duplicates
    kept): `read_records` until `expected` records, then until quiet."""
    return ids_per_user(read_records(settings, settings.kafka.main_topic.name, expected, timeout_s))

"""Helpers shared by the consume integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qywx_ray.consume.pipeline import ConsumePipeline, stop_consumers


@pytest.fixture
def started(ray_session: None) -> Iterator[list[ConsumePipeline]]:
    """Pipelines a test starts; drained and stopped afterwards."""
    pipelines: list[ConsumePipeline] = []
    yield pipelines
    for p in pipelines:
        stop_consumers(p, timeout_s=15)

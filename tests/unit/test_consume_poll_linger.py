"""The poll linger decision, on a fake clock: how long a batch waits for company.

The integration test (test_consume_pipeline.py) checks the outcome end to end; what the
consumer decided (a lone record after a quiet spell lingers 0 s, a record right after a
batch waits for that batch's slot) is asserted here, where no loaded machine can blur it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from qywx_ray.consume import partition_consumer
from qywx_ray.consume.partition_consumer import PartitionConsumerCore
from qywx_ray.consume.settings import ConsumeSettings


class FakeKafka:
    """poll() hands out one record; consume() records the wait it was given."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def poll(self, timeout_s: float) -> Any:
        return "record"

    def consume(self, n: int, timeout_s: float) -> list[Any]:
        self.waits.append(timeout_s)
        return []


def test_a_lone_record_leaves_at_once_and_the_next_waits_for_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = SimpleNamespace(now=5000.0)
    monkeypatch.setattr(partition_consumer, "time", SimpleNamespace(monotonic=lambda: clock.now))
    kafka = FakeKafka()
    core: Any = SimpleNamespace(
        consumer=kafka,
        c=ConsumeSettings(poll_linger_ms=4000),
        _last_batch_s=0.0,
        tracker=SimpleNamespace(serial=0),
    )

    PartitionConsumerCore._poll(core, 500, 1.0)  # after a quiet spell
    clock.now += 1.5
    PartitionConsumerCore._poll(core, 500, 1.0)  # 1.5 s after that batch left
    clock.now += 10.0
    PartitionConsumerCore._poll(core, 500, 1.0)  # quiet again
    assert kafka.waits == [0.0, pytest.approx(2.5), 0.0]

"""Short fault drills through the whole pipeline, each ending with a ground-truth audit.

Simulator → callback → Serve → syncer → Kafka → consumers → user mailboxes → handler,
with the DLQ recovery actor running. Longer drills (brokers, Redis, actor kills) are in
test_long_drills.py and run with `make drills`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from qywx_ray.devstack.pipeline import LocalPipeline
from tests.helpers.drills import chat, finish, wait_or_explain

pytestmark = pytest.mark.integration

FAST_DLQ = {"dlq": {"backoff_base_s": 1.0, "backoff_max_s": 2.0, "scheduler_interval_s": 0.2}}


def test_wecom_errors_slow_api_and_callback_faults(
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    p = pipeline_factory()
    assert p.sim is not None
    p.sim.fault(api="kf/sync_msg", kind="errcode", errcode=45009, count=2)
    p.sim.fault(api="kf/sync_msg", kind="errcode", errcode=-1, count=2)
    p.sim.fault(api="kf/sync_msg", kind="latency", latency_s=1.0, count=3)
    p.sim.fault(api="callback", kind="drop", count=5)  # lost callbacks: the sweep pulls
    p.sim.fault(api="callback", kind="duplicate", count=5)
    total = chat(p, ["wkA", "wkB"], users=6, rounds=5)
    finish(p, total)


def test_poison_and_permanently_failing_messages_go_to_review(
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    p = pipeline_factory(overrides=FAST_DLQ)
    assert p.settings is not None
    assert p.sim is not None
    total = chat(p, ["wkP"], users=4, rounds=2)
    # A record that is not an envelope at all, straight onto the main topic.
    producer = Producer({"bootstrap.servers": p.settings.kafka.bootstrap_servers})
    producer.produce(p.settings.kafka.main_topic.name, b"\x00not json", b"wkP-u0")
    assert producer.flush(10) == 0
    # A message whose handler fails permanently (invalid_message: never retried).
    bad = p.sim.inject("wkP", "wkP-u1", 1, extra={"fail": "permanent"})
    total += chat(p, ["wkP"], users=4, rounds=2)
    # The chat, the failing message and the poison record's letter: waiting for one
    # fewer returned once the poison letter was indexed while the failing message's was
    # still on its way, and the audit then counted that message lost (a loaded run).
    finish(p, total + 2)
    client = p.redis_client()
    assert bad[0].encode() in client.hkeys("qywx:dlq:letters")
    assert client.llen(f"{p.consume.settings.consume.record_key}:calls") >= total


def test_hanging_handler_times_out_and_is_retried_in_order(
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    p = pipeline_factory(overrides={**FAST_DLQ, "consume": {"handler_timeout_s": 1.0}})
    assert p.sim is not None
    hold_key = "drill:release"
    total = chat(p, ["wkH"], users=3, rounds=1)
    stuck = p.sim.inject("wkH", "wkH-u0", 1, extra={"hold": hold_key})
    total += 1 + chat(p, ["wkH"], users=3, rounds=2)
    client = p.redis_client()
    # The hung message times out into the DLQ; once the downstream recovers, it is retried.
    wait_or_explain(
        p,
        lambda: stuck[0].encode() in client.hkeys("qywx:dlq:letters"),
        timeout_s=150,  # recovery actor start + DLQ consume under load
        what="the hung message to be dead-lettered",
    )
    client.set(hold_key, "1")
    result = finish(p, total, processed=total)  # the retried message is processed too
    assert result.processed == total

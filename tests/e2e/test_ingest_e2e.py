"""Simulator → encrypted callback → Serve → syncer host → Kafka, checked against ground truth."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from tests.helpers.e2e import Ingress, read_topic

pytestmark = pytest.mark.integration


def _inject_rounds(ingress: Ingress, kfids: list[str], users: int, per_user: int) -> int:
    """Interleave users so per-user order is meaningful inside each page."""
    total = 0
    for round_ in range(per_user // 5):
        for kfid in kfids:
            for u in range(users):
                ingress.sim.inject(kfid, f"{kfid}-u{u}", 5, size_bytes=200 if round_ % 2 else 0)
                total += 5
    return total


def test_every_message_reaches_kafka_in_per_user_order(
    ingress_factory: Callable[..., Ingress], redis_client: redis.Redis
) -> None:
    ingress = ingress_factory()
    total = _inject_rounds(ingress, ["wkA", "wkB"], users=8, per_user=20)
    got = read_topic(ingress.settings, total)
    truth = ingress.sim.truth()
    expected = {user: ids for users in truth.values() for user, ids in users.items()}
    assert sum(map(len, got.values())) == total  # nothing lost, nothing duplicated
    assert got == expected  # per-user order exactly as WeCom recorded it
    for kfid in ("wkA", "wkB"):
        assert redis_client.hget(f"qywx:cursor:{kfid}", "cursor")  # the checkpoint was persisted


def test_wecom_busy_errors_back_off_then_catch_up(
    ingress_factory: Callable[..., Ingress],
) -> None:
    ingress = ingress_factory()
    ingress.sim.fault(api="kf/sync_msg", kind="errcode", errcode=45009, count=3)
    ingress.sim.fault(api="kf/sync_msg", kind="errcode", errcode=-1, count=2)
    total = _inject_rounds(ingress, ["wkC"], users=4, per_user=10)
    got = read_topic(ingress.settings, total, timeout_s=90)
    truth = ingress.sim.truth()["wkC"]
    assert got == truth


def test_duplicate_callbacks_do_not_duplicate_messages(
    ingress_factory: Callable[..., Ingress],
) -> None:
    ingress = ingress_factory()
    ingress.sim.fault(api="callback", kind="duplicate", count=20)
    total = _inject_rounds(ingress, ["wkD"], users=5, per_user=10)
    got = read_topic(ingress.settings, total)
    assert got == ingress.sim.truth()["wkD"]

"""Dedicated mode, idle expiry and the death race (message arriving while dying)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import ray
import redis as redis_lib

from qywx_ray.consume.pipeline import (
    ConsumePipeline,
    start_consumers,
    user_actor_names,
)
from qywx_ray.consume.testing import (
    check_order,
    ensure_topics,
    envelopes,
    produce,
    records,
    wait_for,
)
from qywx_ray.envelope import Envelope
from qywx_ray.settings import Settings
from tests.helpers.consume import RECORD, consume_test_settings

pytestmark = pytest.mark.integration


def _rounds(users: int, rounds: int) -> list[list[Envelope]]:
    out = []
    for r in range(rounds):
        out.append(
            [
                Envelope(
                    message_id=f"r{u}-{r:06d}",
                    open_kfid="kf-test",
                    external_userid=f"r{u}",
                    msgtype="text",
                    raw={"n": r},
                )
                for u in range(users)
            ]
        )
    return out


@pytest.mark.timeout(240)
def test_dedicated_mode_order_idle_exit_and_death_race(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(
        make_settings, unique, mode="dedicated", idle_lifetime_s=1.0, idle_sweep_interval_s=0.1
    )
    ensure_topics(s)
    msgs = envelopes(8, 100)  # order: 8 users (8 actors), 100 messages each, interleaved
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 90)
    rep = check_order(records(redis_client, RECORD), msgs)
    assert rep.missing == []
    assert rep.inversions == 0
    assert rep.duplicates == 0
    ns = s.consume.namespace
    hosted = sum(ray.get(h.snapshot.remote(), timeout=10)["counts"]["processed"] for h in p.hosts)
    assert hosted == 0  # every message ran in a dedicated user actor, none fell back
    # Idle expiry: every user actor ends itself once idle and empty.
    assert wait_for(lambda: user_actor_names(ns) == [], 60), user_actor_names(ns)
    # Death race: messages keep arriving around each actor's idle deadline.
    rounds = _rounds(3, 5)
    for batch in rounds:
        produce(s, batch)
        time.sleep(1.05)  # pacing the input around the 1 s idle lifetime (not a sync point)
    expected = [e for batch in rounds for e in batch]
    total = len(msgs) + len(expected)
    assert wait_for(lambda: redis_client.llen(RECORD) >= total, 90)
    rep = check_order(records(redis_client, RECORD), msgs + expected)
    assert rep.missing == []
    assert rep.inversions == 0
    assert rep.duplicates == 0
    stats = p.snapshots()[0]["stats"]
    assert stats["recoveries"] >= 1, stats  # some message met a dying/dead actor and was re-sent


@pytest.mark.timeout(120)
def test_hosted_idle_expiry_then_new_mailbox(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(make_settings, unique, idle_lifetime_s=0.5, idle_sweep_interval_s=0.1)
    ensure_topics(s)
    msgs = envelopes(30, 5)
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 60)

    def live_users() -> int:
        return sum(ray.get(h.snapshot.remote(), timeout=10)["users"] for h in p.hosts)

    assert wait_for(lambda: live_users() == 0, 20)
    rounds = _rounds(5, 4)
    for batch in rounds:
        produce(s, batch)
        time.sleep(0.5)  # pacing around the idle lifetime
    expected = [e for batch in rounds for e in batch]
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs) + len(expected), 60)
    rep = check_order(records(redis_client, RECORD), msgs + expected)
    assert rep.missing == []
    assert rep.inversions == 0
    assert rep.duplicates == 0


@pytest.mark.timeout(120)
def test_dedicated_cap_falls_back_to_hosted(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = consume_test_settings(make_settings, unique, mode="dedicated", max_dedicated_actors=2)
    ensure_topics(s)
    msgs = envelopes(6, 5)
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 60)
    rep = check_order(records(redis_client, RECORD), msgs)
    assert rep.missing == []
    assert rep.inversions == 0
    assert rep.duplicates == 0
    assert len(user_actor_names(s.consume.namespace)) == 2  # the cap
    hosted = sum(ray.get(h.snapshot.remote(), timeout=10)["counts"]["processed"] for h in p.hosts)
    assert hosted == len(msgs) - 2 * 5  # the other 4 users ran in the shared hosts

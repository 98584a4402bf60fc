"""Dedicated mode, idle expiry and the death race (message arriving while dying)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import ray
import redis as redis_lib

from qywx_ray.consume.pipeline import (
    ConsumePipeline,
    start_consumers,
    stop_consumers,
    user_actor_names,
)
from qywx_ray.consume.placement import placement_prefix
from qywx_ray.envelope import Envelope
from qywx_ray.settings import Settings
from qywx_ray.testing.consume import (
    check_order,
    ensure_topics,
    envelopes,
    produce,
    records,
    wait_for,
)
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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.mark.timeout(300)
def test_dedicated_warm_pool_serves_new_users_refills_and_spares_outlive_idle(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    """`dedicated_pool_size`: new dedicated users run on spares started before they came
    (their records name the spares), in order; consumer 0 refills the pool; a claimed
    spare ends after its idle lifetime, an unclaimed one outlives it, and a spare the
    pool no longer lists (claimed by a user who never came) ends too."""
    s = consume_test_settings(
        make_settings,
        unique,
        mode="dedicated",
        dedicated_pool_size=3,
        idle_lifetime_s=2.0,
        idle_sweep_interval_s=0.1,
    )
    ensure_topics(s)
    p = start_consumers(s)
    started.append(p)
    ns = s.consume.namespace
    prefix = placement_prefix(s.consume.name_prefix)
    spares_key = f"{prefix}:pool:spares"

    def listed() -> set[str]:
        return {_text(m) for m in redis_client.smembers(spares_key)}

    assert p.wait_pool_full(180)
    original = listed()
    assert len(original) == 3
    assert set(user_actor_names(ns)) == original  # no user yet: only the spares

    def pool_checks(name: str) -> int:
        handle: Any = ray.get_actor(name, namespace=ns)
        return int(ray.get(handle.snapshot.remote(), timeout=10)["pool_checks"])

    # Every spare has idled past its lifetime and decided to stay a spare (it asked the
    # pool): a claim must still reach the very actor that waited (no end before its first
    # delivery, no fallback start).
    assert wait_for(lambda: min(pool_checks(n) for n in original) >= 1, 60)
    msgs = envelopes(2, 20)
    produce(s, msgs)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 90)
    rep = check_order(records(redis_client, RECORD), msgs)
    assert rep.missing == []
    assert rep.inversions == 0
    assert rep.duplicates == 0
    hosted = sum(ray.get(h.snapshot.remote(), timeout=10)["counts"]["processed"] for h in p.hosts)
    assert hosted == 0
    assert p.snapshots()[0]["stats"]["recoveries"] == 0  # no claimed spare ended under us
    claimed = {_text(redis_client.get(f"{prefix}:u:u{i}")) for i in range(2)}
    assert len(claimed) == 2
    assert claimed <= original  # both users got a spare, each its own
    (unclaimed,) = original - claimed
    # Refilled: three spares again, the claimed ones no longer among them.
    assert wait_for(lambda: len(listed()) == 3 and not (listed() & claimed), 180), listed()
    # The claimed ones end after their idle lifetime; the spare started before them and
    # never claimed has been idle longer, and stays.
    assert wait_for(lambda: not (set(user_actor_names(ns)) & claimed), 60)
    assert unclaimed in user_actor_names(ns)
    spare: Any = ray.get_actor(unclaimed, namespace=ns)
    snap: Any = ray.get(spare.snapshot.remote(), timeout=10)
    assert snap["spare"] is True
    # A spare the pool no longer lists ends like any idle dedicated actor.
    redis_client.srem(spares_key, unclaimed)
    assert wait_for(lambda: unclaimed not in user_actor_names(ns), 60)
    assert wait_for(lambda: len(listed()) == 3, 180)  # and the keeper replaced it


@pytest.mark.timeout(300)
def test_dedicated_warm_pool_after_a_pipeline_restart_lists_only_live_spares(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    """Stopping a pipeline kills every user actor, spares included, but leaves the pool's
    lists in Redis. The next keeper must not count (or hand out) those dead names: it
    takes them off the list and starts new spares, and a new user then runs on one."""
    s = consume_test_settings(make_settings, unique, mode="dedicated", dedicated_pool_size=2)
    ensure_topics(s)
    ns = s.consume.namespace
    spares_key = f"{placement_prefix(s.consume.name_prefix)}:pool:spares"

    def listed() -> set[str]:
        return {_text(m) for m in redis_client.smembers(spares_key)}

    first = start_consumers(s)
    started.append(first)
    assert first.wait_pool_full(180)
    dead = listed()
    assert len(dead) == 2
    stop_consumers(first, timeout_s=15)  # kills consumers, hosts and every user actor
    started.remove(first)
    assert wait_for(lambda: not (set(user_actor_names(ns)) & dead), 60)
    assert listed() == dead  # the lists outlive the actors
    p = start_consumers(s)
    started.append(p)
    assert p.wait_pool_full(180)
    fresh = listed()
    assert len(fresh) == 2
    assert not (fresh & dead)  # the dead names were taken off, new spares started
    assert fresh <= set(user_actor_names(ns))
    pool = p.snapshots()[0]["pool"]
    assert pool["retired"] == 2
    msgs = envelopes(1, 5)
    produce(s, msgs)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 90)
    rep = check_order(records(redis_client, RECORD), msgs)
    assert (rep.missing, rep.inversions, rep.duplicates) == ([], 0, 0)
    record = _text(redis_client.get(f"{placement_prefix(s.consume.name_prefix)}:u:u0"))
    assert record in fresh  # a live spare, not a dead name
    assert p.snapshots()[0]["stats"]["recoveries"] == 0

"""Crash safety: kill -9 a host actor or a consumer actor mid-stream; rebalance mid-stream."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest
import ray
import redis as redis_lib

from qywx_ray.consume.partition_consumer import PartitionConsumer
from qywx_ray.consume.pipeline import ConsumePipeline, start_consumers
from qywx_ray.settings import Settings
from qywx_ray.testing.consume import (
    check_order,
    committed_offsets,
    ensure_topics,
    envelopes,
    produce,
    records,
    wait_for,
)
from tests.helpers.consume import RECORD, consume_test_settings

pytestmark = pytest.mark.integration


def _pid(actor: Any) -> int | None:
    try:
        return int(ray.get(actor.pid.remote(), timeout=10))
    except (ray.exceptions.RayError, TimeoutError):
        return None  # restarting


def _restarted(actor: Any, old_pid: int) -> bool:
    return wait_for(lambda: _pid(actor) not in (None, old_pid), 60)


def _assert_exactly_once_in_order(redis_client: redis_lib.Redis, msgs: list[Any]) -> int:
    rep = check_order(records(redis_client, RECORD), msgs)
    assert rep.missing == [], f"lost {len(rep.missing)}"
    assert rep.inversions == 0
    assert rep.duplicates == 0
    return int(redis_client.llen(f"{RECORD}:calls")) - len(msgs)  # handler re-runs


def _kill_mid_stream(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
    pick: Callable[[ConsumePipeline], Any],
) -> tuple[ConsumePipeline, int, int]:
    """kill -9 the actor `pick` chooses once 1,000 of 6,000 messages are handled, then
    check every message was handled exactly once, in per-user order, and committed.
    Returns (pipeline, handled at the kill, handler re-runs)."""
    s = consume_test_settings(make_settings, unique, kafka_consumer={"poll_batch_max": 200})
    ensure_topics(s)
    msgs = envelopes(200, 30)
    produce(s, msgs)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) >= 1000, 60)
    victim = pick(p)
    pid = ray.get(victim.pid.remote(), timeout=10)
    os.kill(pid, signal.SIGKILL)
    at_kill = int(redis_client.llen(RECORD))
    assert at_kill < len(msgs)  # really mid-stream
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(msgs), 90), redis_client.llen(RECORD)
    rerun = _assert_exactly_once_in_order(redis_client, msgs)
    assert _restarted(victim, pid)  # Ray restarted it
    assert wait_for(lambda: sum(max(0, o) for o in committed_offsets(s, 4)) == len(msgs), 30)
    return p, at_kill, rerun


@pytest.mark.timeout(180)
def test_kill_9_host_actor_mid_stream(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    p, at_kill, rerun = _kill_mid_stream(
        make_settings, unique, redis_client, started, lambda p: p.hosts[0]
    )
    stats = p.snapshots()[0]["stats"]
    assert stats["resent"] > 0  # the dead host's in-flight messages were sent again
    print(f"host kill at {at_kill}: resent={stats['resent']} handler re-runs={rerun}")


@pytest.mark.timeout(180)
def test_kill_9_consumer_actor_mid_stream(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    p, at_kill, rerun = _kill_mid_stream(
        make_settings, unique, redis_client, started, lambda p: p.consumers[0]
    )
    dups = sum(ray.get(h.snapshot.remote(), timeout=10)["counts"]["duplicate"] for h in p.hosts)
    print(f"consumer kill at {at_kill}: dedup skips={dups} handler re-runs={rerun}")
    # The hosts lived on: each record the new consumer sent again was either done (skipped
    # by dedup) or still in flight (it waits with its copy), so no handler ran twice.
    assert rerun == 0


@pytest.mark.timeout(180)
def test_second_consumer_joins_and_leaves_mid_stream(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    # Dynamic membership so a leaving consumer hands its partitions back at once.
    s = consume_test_settings(
        make_settings, unique, kafka_consumer={"poll_batch_max": 200}, static_membership=False
    )
    ensure_topics(s)
    first = envelopes(200, 20)
    produce(s, first)
    p = start_consumers(s)
    started.append(p)
    assert wait_for(lambda: redis_client.llen(RECORD) >= 500, 60)
    s2 = s.model_copy(deep=True)
    s2.consume.num_consumers = 2  # same group, second member, consumer index 1
    joiner = PartitionConsumer.options(  # type: ignore[attr-defined]
        name=f"t{unique}-consumer-1", namespace=s.consume.namespace, max_concurrency=8
    ).remote(s2, 1)
    assert wait_for(lambda: bool(ray.get(joiner.snapshot.remote(), timeout=10)["assigned"]), 60)
    second = envelopes(200, 10, seed=3)
    for i, e in enumerate(second):  # continue each user's sequence after the first batch
        user = e.external_userid
        second[i] = e.model_copy(update={"message_id": f"{user}-{100000 + i:06d}"})
    produce(s, second)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(first) + 500, 60)
    stopped = ray.get(joiner.stop.remote(20), timeout=40)
    assert stopped["error"] is None
    ray.kill(joiner, no_restart=True)
    assert wait_for(lambda: redis_client.llen(RECORD) >= len(first) + len(second), 90)
    all_msgs = first + second
    rerun = _assert_exactly_once_in_order(redis_client, all_msgs)
    print(f"rebalance: handler re-runs={rerun}")
    stats = p.snapshots()[0]["stats"]
    assert stats["rebalances"] >= 3  # assign, revoke for the joiner, re-assign after it left
    assert wait_for(lambda: sum(max(0, o) for o in committed_offsets(s, 4)) == len(all_msgs), 30)

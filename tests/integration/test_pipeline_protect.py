"""Isolation under load through the running consume path (real Kafka, Redis, Ray).

200 normal customers write at a human rate (one message every few seconds) while 5
attackers flood far above their limit on the same partitions and hosts. Every normal
message is processed and none is denied; every attacker message is accounted for: either
processed or in the DLQ topic with reason rate_limited / user_blocked. The normal users'
p99 latency (ingest → handler) is printed with and without the attackers (a measurement,
not an assertion). Messages are rated at their WeCom send_time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib
from confluent_kafka import Consumer, Producer

from qywx_ray.consume.pipeline import ConsumePipeline, start_consumers, stop_consumers
from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.envelope import Envelope
from qywx_ray.kafka.config import consumer_config, producer_config
from qywx_ray.obs.stats import percentiles
from qywx_ray.settings import Settings
from qywx_ray.testing.consume import ensure_topics, produce, wait_for

pytestmark = pytest.mark.integration

RECORD = "qywx:test:protectrecord"
NORMAL_USERS = 200
NORMAL_MSGS = 3  # each, one every NORMAL_GAP_S
NORMAL_GAP_S = 4.0
ATTACKERS = 5
ATTACK_RATE = 25  # messages per second per attacker (limit: 5 per 10 s)


@pytest.fixture
def started(ray_session: None) -> Iterator[list[ConsumePipeline]]:
    pipelines: list[ConsumePipeline] = []
    yield pipelines
    for p in pipelines:
        stop_consumers(p, timeout_s=15)


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _env(user: str, n: int, **raw: Any) -> Envelope:
    return Envelope(
        message_id=f"{user}-{n:06d}",
        open_kfid="kf-prot",
        external_userid=user,
        msgtype="text",
        send_time=int(time.time()),
        raw={"text": {"content": f"m{n}"}, **raw},
    )


def _traffic(s: Settings, prefix: str, attackers: int) -> tuple[list[str], list[str]]:
    """Paced production: normal users spread over their slots, attackers at full rate."""
    producer = Producer(producer_config(s.kafka))
    topic = s.kafka.main_topic.name
    schedule: list[tuple[float, str, int, bool]] = []
    for i in range(NORMAL_USERS):
        offset = (i / NORMAL_USERS) * NORMAL_GAP_S
        for n in range(NORMAL_MSGS):
            schedule.append((offset + n * NORMAL_GAP_S, f"{prefix}n{i}", n, True))
    span_s = NORMAL_MSGS * NORMAL_GAP_S
    for a in range(attackers):
        for n in range(int(span_s * ATTACK_RATE)):
            schedule.append((n / ATTACK_RATE + a * 0.01, f"{prefix}atk{a}", n, False))
    schedule.sort()
    normal: list[str] = []
    attack: list[str] = []
    t0 = time.monotonic()
    for at, user, n, is_normal in schedule:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            producer.poll(delay)  # pacing the load generator, not synchronisation
        env = _env(user, n, track_latency=1) if is_normal else _env(user, n)
        (normal if is_normal else attack).append(env.message_id)
        producer.produce(topic, key=env.key, value=env.to_bytes(), headers=list(env.headers()))
    assert producer.flush(30) == 0
    return normal, attack


class DeadLetters:
    """Reads the DLQ topic: message_id -> failure reason."""

    def __init__(self, s: Settings, group: str) -> None:
        self.consumer = Consumer(
            consumer_config(s.kafka, group, **{"auto.offset.reset": "earliest"})
        )
        self.consumer.subscribe([s.kafka.dlq_topic.name])
        self.reasons: dict[str, str] = {}

    def read(self, for_s: float = 1.0) -> dict[str, str]:
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            for m in self.consumer.consume(1000, 0.2):
                if m.error() is None:
                    letter = DeadLetterMessage.from_bytes(m.value())
                    self.reasons[letter.message_id] = letter.failure_reason.value
        return self.reasons

    def close(self) -> None:
        self.consumer.close()


def _p99(redis_client: redis_lib.Redis, ids: list[str]) -> float:
    values = redis_client.hmget(f"{RECORD}:latency_ms", ids)
    return percentiles((int(v) for v in values if v is not None), (99,))[99]


def test_attackers_do_not_hurt_normal_users(
    make_settings: Callable[..., Settings],
    unique: str,
    redis_client: redis_lib.Redis,
    started: list[ConsumePipeline],
) -> None:
    s = make_settings(
        consume={
            "namespace": f"qywx-test-{unique}",
            "name_prefix": f"t{unique}",
            "handler": "qywx_ray.testing.handlers:recording_handler",
            "record_key": RECORD,
            "num_hosts": 2,
            "num_consumers": 1,
            "commit_interval_s": 0.2,
            "completion_flush_ms": 10,
        },
    )
    assert s.protect.enabled
    assert s.consume.admission
    ensure_topics(s)
    p = start_consumers(s)
    started.append(p)
    assert p.wait_assigned(s.kafka.main_topic.partitions, 60)

    def effects() -> set[str]:
        return {_s(x).partition("|")[2] for x in redis_client.lrange(RECORD, 0, -1)}

    # Warm up (first batches pay for connections and imports), then the baseline alone.
    warm = [_env(f"w{i}", 0) for i in range(50)]
    produce(s, warm)
    assert wait_for(lambda: {e.message_id for e in warm} <= effects(), 30)
    base_normal, _ = _traffic(s, "a", attackers=0)
    if not wait_for(lambda: set(base_normal) <= effects(), 30):
        dlq = DeadLetters(s, f"dbg-{unique}")
        dead = dlq.read(3)
        missing = set(base_normal) - effects()
        pytest.fail(
            f"{len(missing)} missing, e.g. {sorted(missing)[:5]}; dlq {len(dead)} "
            f"{sorted(set(dead.values()))}; snaps {p.snapshots()}"
        )
    p99_alone = _p99(redis_client, base_normal)

    # Same normal load with 5 attackers flooding the same partitions and hosts.
    normal, attack = _traffic(s, "b", attackers=ATTACKERS)
    dlq = DeadLetters(s, f"audit-{unique}")
    try:

        def all_accounted() -> bool:
            dead = dlq.read()
            return set(normal) <= effects() and set(attack) <= effects() | set(dead)

        assert wait_for(all_accounted, 60, interval_s=0.5)
        accounted = dlq.read()
    finally:
        dlq.close()
    p99_attacked = _p99(redis_client, normal)
    dead_normal = [m for m in [*base_normal, *normal] if m in accounted]
    assert dead_normal == []  # no normal message was denied
    reasons = {accounted[m] for m in attack if m in accounted}
    assert reasons <= {"rate_limited", "user_blocked"}
    denied = sum(1 for m in attack if m in accounted)
    assert denied >= len(attack) - ATTACKERS * 20  # the flood was actually held back
    print(
        f"\nnormal p99 latency: alone {p99_alone:.0f} ms, with {ATTACKERS} attackers "
        f"{p99_attacked:.0f} ms; attack messages {len(attack)}, denied {denied} "
        f"({sorted(reasons)}), normal messages {len(base_normal) + len(normal)}"
    )

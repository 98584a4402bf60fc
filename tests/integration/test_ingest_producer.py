"""KafkaIngestProducer against the real broker: batches, back-pressure, murmur2, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from qywx_ray.envelope import Envelope
from qywx_ray.ingest.producer import Delivery, HeldBehind, ProduceError
from qywx_ray.obs import metrics
from tests.helpers.ingest import (
    create_topic,
    dead_producer,
    good_producer,
    per_user_order,
    read_topic,
    wecom_msg,
)

pytestmark = pytest.mark.integration


def envelopes(n: int, users: int, tag: str = "p") -> list[Envelope]:
    return [Envelope.from_wecom(wecom_msg(f"{tag}{i:05d}", f"u{i % users:03d}")) for i in range(n)]


def java_murmur2(data: bytes) -> int:
    """org.apache.kafka.common.utils.Utils.murmur2, as a signed 32-bit int."""
    mask = 0xFFFFFFFF
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    for i in range(length // 4):
        k = data[4 * i] | data[4 * i + 1] << 8 | data[4 * i + 2] << 16 | data[4 * i + 3] << 24
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    tail = length & ~3
    rem = length % 4
    if rem == 3:
        h ^= data[tail + 2] << 16
    if rem >= 2:
        h ^= data[tail + 1] << 8
    if rem >= 1:
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h >= 1 << 31 else h


def java_partition(key: bytes, partitions: int) -> int:
    return (java_murmur2(key) & 0x7FFFFFFF) % partitions


def test_java_murmur2_reference_values() -> None:
    # Values from Kafka's own UtilsTest.testMurmur2.
    assert java_murmur2(b"21") == -973932308
    assert java_murmur2(b"foobar") == -790332482
    assert java_murmur2(b"a-little-bit-long-string") == -985981536
    assert java_murmur2(b"a-little-bit-longer-string") == -1486304829
    assert java_murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == -58897971
    assert java_murmur2(b"abc") == 479470107


async def test_produce_batch_round_trip(make_settings) -> None:
    settings = make_settings()
    create_topic(settings)
    producer = good_producer(settings)
    try:
        envs = envelopes(500, users=40)
        before = metrics.counter("qywx_produced_total", "").value()
        result = await producer.produce_batch(envs)
        assert result.ok
        assert len(result) == 500
        assert [d.envelope.message_id for d in result.deliveries] == [e.message_id for e in envs]
        assert all(d.partition is not None and d.offset is not None for d in result.deliveries)
        assert metrics.counter("qywx_produced_total", "").value() - before == 500
    finally:
        assert producer.close(10) == 0
    records = read_topic(settings, 500)
    assert len(records) == 500
    got = per_user_order(records)
    want: dict[str, list[str]] = {}
    for e in envs:
        want.setdefault(e.external_userid, []).append(e.message_id)
    assert got == want
    assert records[0][2].raw["text"] == {"content": "hi"}


async def test_a_record_that_cannot_be_queued_holds_back_its_users_later_records(
    make_settings,
) -> None:
    """Too large for the producer (fails at produce()): the same user's later record is
    not sent either (it goes to the spool behind it), other users' records are."""
    settings = make_settings()
    create_topic(settings)
    producer = good_producer(settings)
    try:
        first = Envelope.from_wecom(wecom_msg("h00000", "uA"))
        big = Envelope.from_wecom(wecom_msg("h00001", "uA", text="x" * 1_200_000))
        later = Envelope.from_wecom(wecom_msg("h00002", "uA"))
        other = Envelope.from_wecom(wecom_msg("h00003", "uB"))
        result = await producer.produce_batch([first, big, later, other])
        ok = {d.envelope.message_id: d.ok for d in result.deliveries}
        assert ok == {"h00000": True, "h00001": False, "h00002": False, "h00003": True}
        held = result.deliveries[2].error
        assert isinstance(held, HeldBehind)
        assert "held behind" in str(held)
        assert "produce failed" in str(result.deliveries[1].error)
    finally:
        assert producer.close(10) == 0
    got = per_user_order(read_topic(settings, 2))
    assert got == {"uA": ["h00000"], "uB": ["h00003"]}


async def test_back_pressure_on_full_queue_loses_nothing(make_settings) -> None:
    settings = make_settings()
    create_topic(settings)
    # A 20-message local queue: nearly every produce meets BufferError and must wait.
    producer = good_producer(settings, **{"queue.buffering.max.messages": 20})
    try:
        envs = envelopes(3000, users=7, tag="bp")
        waits = metrics.counter("qywx_produce_backpressure_total", "")
        before = waits.value()
        result = await producer.produce_batch(envs)
        assert result.ok, result.failed[:3]
        assert waits.value() - before > 100  # BufferError really happened, and was absorbed
    finally:
        producer.close(10)
    records = read_topic(settings, 3000)
    assert sorted(env.message_id for _, _, env in records) == sorted(e.message_id for e in envs)


async def test_partition_is_javas_murmur2(make_settings) -> None:
    settings = make_settings()
    partitions = 4
    create_topic(settings, partitions)
    producer = good_producer(settings)
    try:
        envs = [
            Envelope.from_wecom(wecom_msg(f"k{i}", f"wmUser-{i}-{i * 7919:x}")) for i in range(200)
        ]
        result = await producer.produce_batch(envs)
        assert result.ok
        mismatches = [
            (d.envelope.external_userid, d.partition)
            for d in result.deliveries
            if d.partition != java_partition(d.envelope.key, partitions)
        ]
        assert mismatches == []
        assert len({d.partition for d in result.deliveries}) == partitions
    finally:
        producer.close(10)


async def test_fire_and_forget_callback_and_confirmed_modes(make_settings) -> None:
    settings = make_settings()
    create_topic(settings)
    producer = good_producer(settings)
    got: list[Delivery] = []
    done = threading.Event()

    def on_delivery(d: Delivery) -> None:
        got.append(d)
        done.set()

    try:
        producer.produce_nowait(envelopes(1, 1, tag="nowait")[0])
        producer.produce(envelopes(1, 1, tag="cb")[0], on_delivery)
        confirmed = await producer.produce_confirmed(envelopes(1, 1, tag="conf")[0])
        assert confirmed.ok
        assert confirmed.offset is not None
        assert await asyncio.to_thread(done.wait, 30)
        assert got[0].ok
        assert got[0].envelope.message_id == "cb00000"
    finally:
        assert producer.close(10) == 0
    ids = {env.message_id for _, _, env in read_topic(settings, 3)}
    assert ids == {"nowait00000", "cb00000", "conf00000"}


async def test_unreachable_broker_reports_every_message_failed(make_settings) -> None:
    settings = make_settings()
    producer = dead_producer(settings, timeout_ms=1500)
    try:
        result = await producer.produce_batch(envelopes(50, 5, tag="dead"))
        assert len(result.failed) == 50
        assert not result.acked
        assert all(isinstance(d.error, ProduceError) for d in result.failed)
        # Each failure is librdkafka's own report (its 1.5 s delivery timeout decided it),
        # not our 10 s wait for reports running out.
        assert all(
            isinstance(d.error, ProduceError) and d.error.kafka_error is not None
            for d in result.failed
        ), {str(d.error) for d in result.failed}
        with pytest.raises(ProduceError):
            await producer.produce_confirmed(envelopes(1, 1, tag="dead1")[0])
    finally:
        producer.close(1)


class FatallyFailedProducer:
    """Stands in for a librdkafka producer after a fatal idempotence error: every
    produce raises the fatal error, as librdkafka does until the instance is replaced."""

    def __init__(self, error_cb: Callable[[KafkaError], None]) -> None:
        self.error_cb = error_cb
        self.purged = False

    def produce(self, *args: Any, **kwargs: Any) -> None:
        err = KafkaError(KafkaError._FATAL, "simulated: producer fenced", fatal=True)
        self.error_cb(err)
        raise KafkaException(err)

    def poll(self, timeout: float) -> int:
        time.sleep(min(timeout, 0.01))  # the poll thread's loop: keep it from spinning
        return 0

    def purge(self, *args: Any, **kwargs: Any) -> None:
        self.purged = True

    def flush(self, timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return 0


async def test_a_fatal_producer_error_rebuilds_the_producer(make_settings) -> None:
    """Issue 19 item 6. Before the fix the fatal error was stored and never acted on:
    every later produce failed, everything went to the spool, and the replayer used the
    same dead producer - the spool grew until Redis was full."""
    settings = make_settings()
    create_topic(settings)
    producer = good_producer(settings)
    healthy = producer._producer
    dead = FatallyFailedProducer(producer._on_error)
    producer._producer = dead  # type: ignore[assignment]
    rebuilt = metrics.counter("qywx_producer_rebuilt_total", "").value()
    try:
        first = await producer.produce_batch(envelopes(4, 2, tag="f"))
        assert len(first.failed) == 4
        assert producer.fatal_error is not None
        second = await producer.produce_batch(envelopes(4, 2, tag="r"))
        assert second.ok, [str(d.error) for d in second.failed]
        assert producer._producer is not dead
        assert dead.purged
        assert producer.fatal_error is None
        assert metrics.counter("qywx_producer_rebuilt_total", "").value() == rebuilt + 1
    finally:
        producer.close(10)
        healthy.flush(1)
    ids = {env.message_id for _, _, env in read_topic(settings, 4)}
    assert ids == {f"r{i:05d}" for i in range(4)}

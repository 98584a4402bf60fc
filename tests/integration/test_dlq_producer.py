"""DLQ producer on a real Kafka: round trip with headers; topic unreachable → emergency file
(fsync'd), and replay re-publishes every entry exactly once: by hand, or in the background
from the producers themselves once the topic takes writes again."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.dlq import emergency
from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.dlq.producer import EMERGENCY_WRITES, PRODUCED, DLQProducer, replay_emergency
from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from qywx_ray.settings import Settings
from qywx_ray.testing.consume import wait_for
from tests.helpers.dlq import letters_for
from tests.helpers.kafka import create_topics, headers_of, read_records

pytestmark = pytest.mark.integration


def test_round_trip_with_headers(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    create_topics(settings, (settings.kafka.dlq_topic.name, 2))
    letters = letters_for(200)
    before = PRODUCED.value(reason="queue_full")
    with DLQProducer(settings) as producer:
        producer.send_many_sync(letters)
    assert PRODUCED.value(reason="queue_full") - before == 100
    got = read_records(settings, settings.kafka.dlq_topic.name, 200)
    assert len(got) == 200
    by_id = {DeadLetterMessage.from_bytes(m.value()).message_id: m for m in got}
    for letter in letters:
        m = by_id[letter.message_id]
        assert m.key() == letter.user_id.encode()
        headers = headers_of(m)
        assert headers["failure_reason"] == letter.failure_reason.value.encode()
        assert headers["retry_count"] == b"0"
        assert headers["message_id"] == letter.message_id.encode()
        assert DeadLetterMessage.from_bytes(m.value()) == letter
    assert not settings.dlq_emergency_dir.exists()


async def test_async_send_many(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    create_topics(settings, (settings.kafka.dlq_topic.name, 2))
    producer = DLQProducer(settings)
    try:
        await producer.send_many(letters_for(20))
    finally:
        producer.close()
    assert len(read_records(settings, settings.kafka.dlq_topic.name, 20)) == 20


def test_unreachable_topic_goes_to_emergency_file_and_replays_once(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = make_settings(dlq={"produce_timeout_s": 2.0, "breaker_failure_threshold": 1})
    down = good.model_copy(deep=True)
    down.kafka.bootstrap_servers = "127.0.0.1:1"  # nothing listens there
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    before = EMERGENCY_WRITES.total()
    letters = letters_for(50, "e")
    producer = DLQProducer(down, replay_in_background=False)
    # The DLQ timeout is short: librdkafka gives up on a letter after produce_timeout_s.
    assert producer._conf["delivery.timeout.ms"] == 2000
    published: list[int] = []
    publish = producer.publish

    def counted(batch: Any) -> list[bool]:
        published.append(len(batch))
        return publish(batch)

    producer.publish = counted  # type: ignore[method-assign,assignment]
    try:
        producer.send_many_sync(letters[:30])
        assert producer.breaker.state == "open"
        producer.send_many_sync(letters[30:])  # breaker open: straight to the file
    finally:
        producer.close(timeout_s=0.5)
    assert published == [30]  # the second call never tried Kafka
    assert synced, "emergency lines must be fsync'd before send_many returns"
    assert EMERGENCY_WRITES.total() - before == 50
    files = sorted(Path(good.dlq_emergency_dir).glob("dlq_emergency_*.jsonl"))
    assert [f.name for f in files] == [time.strftime("dlq_emergency_%Y%m%d.jsonl", time.gmtime())]
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(lt.letter_id for lt in letters)

    create_topics(good, (good.kafka.dlq_topic.name, 2))
    report = replay_emergency(good)
    assert (report.published, report.failed, report.already_done) == (50, 0, 0)
    assert not files[0].exists()  # every line acknowledged: the file is gone
    again = replay_emergency(good)
    assert (again.published, again.files) == (0, 0)
    got = read_records(good, good.kafka.dlq_topic.name, 50)
    ids = [DeadLetterMessage.from_bytes(m.value()).letter_id for m in got]
    assert sorted(ids) == sorted(lt.letter_id for lt in letters)  # each exactly once


def test_emergency_file_replays_itself_once_the_topic_takes_writes(
    make_settings: Callable[..., Settings],
) -> None:
    """The DLQ topic is missing (auto-create is off: every produce fails) while letters
    wait in the emergency file; two producers on this node (two hosts) keep trying in the
    background, and once the topic exists each letter reaches it exactly once."""
    good = make_settings(
        dlq={
            "produce_timeout_s": 2.0,
            "breaker_failure_threshold": 1,
            "breaker_open_s": 0.5,
            "emergency_replay_interval_s": 0.2,
            "emergency_replay_backoff_max_s": 1.0,
        }
    )
    letters = letters_for(40, "bg")
    path = emergency.write_letters(good.dlq_emergency_dir, letters, time.time())
    before = emergency.REPLAYED.total()
    first, second = DLQProducer(good), DLQProducer(good)
    try:
        # A background round was refused (the topic does not exist) and opened a breaker.
        assert wait_for(lambda: {first.breaker.state, second.breaker.state} != {"closed"}, 60)
        assert path.exists()
        assert emergency.pending_count(good.dlq_emergency_dir) == 40
        create_topics(good, (good.kafka.dlq_topic.name, 2))
        assert wait_for(lambda: not path.exists(), 90)
    finally:
        first.close(timeout_s=0.5)
        second.close(timeout_s=0.5)
    assert emergency.REPLAYED.total() - before == 40
    got = read_records(good, good.kafka.dlq_topic.name, 40)
    ids = [DeadLetterMessage.from_bytes(m.value()).letter_id for m in got]
    assert sorted(ids) == sorted(lt.letter_id for lt in letters)  # each exactly once


def test_raises_when_neither_kafka_nor_the_emergency_file_can_take_it(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the emergency directory should be")
    settings = make_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1"},
        dlq={"produce_timeout_s": 1.0, "emergency_dir": str(blocker / "dlq")},
    )
    producer = DLQProducer(settings)
    try:
        with pytest.raises(InfraError, match="nor to"):
            producer.send_many_sync(letters_for(3, "x"))
    finally:
        producer.close(timeout_s=0.2)


async def test_sink_for_the_consume_path(make_settings: Callable[..., Settings]) -> None:
    from qywx_ray.consume.types import DeadLetter
    from qywx_ray.dlq.sink import make_sink

    settings = make_settings()
    create_topics(settings, (settings.kafka.dlq_topic.name, 2))
    host_letters = [
        DeadLetter(
            reason="downstream_error",
            error="500",
            message_id=f"s{i}",
            user="u1",
            open_kfid="kf",
            topic="main",
            partition=0,
            offset=i,
            timestamp_ms=0,
            value=Envelope(
                message_id=f"s{i}", open_kfid="kf", external_userid="u1", msgtype="text"
            ).to_bytes(),
        )
        for i in range(5)
    ]
    sink = make_sink(settings)
    try:
        await sink.dead_letter(host_letters)
    finally:
        sink.close()
    got = read_records(settings, settings.kafka.dlq_topic.name, 5)
    assert sorted(DeadLetterMessage.from_bytes(m.value()).message_id for m in got) == [
        f"s{i}" for i in range(5)
    ]

"""Pure DLQ logic: letter format, policy, backoff, strategies, breaker, emergency file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qywx_ray.breaker import Breaker
from qywx_ray.dlq import emergency
from qywx_ray.dlq.message import (
    ActionType,
    DeadLetterMessage,
    KafkaSource,
    calculate_priority,
    is_recoverable,
    make_dead_letter,
)
from qywx_ray.dlq.parking import parks_for
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.dlq.strategies import (
    backoff_s,
    decide,
    default_strategies,
    is_dlq_retry,
    retry_count_of,
)
from qywx_ray.envelope import Envelope
from qywx_ray.errors import EnvelopeError
from qywx_ray.reasons import FailureReason

T0 = 1_800_000_000.0


def envelope(mid: str = "m1", user: str = "u1") -> Envelope:
    return Envelope(
        message_id=mid,
        open_kfid="kf1",
        external_userid=user,
        msgtype="text",
        raw={"msgid": mid, "text": {"content": "你好"}},
        ingest_ts_ms=1,
    )


def letter(
    reason: FailureReason = FailureReason.DOWNSTREAM_ERROR,
    retry_count: int = 0,
    settings: DLQSettings | None = None,
    user_group: str = "normal",
) -> DeadLetterMessage:
    return make_dead_letter(
        reason=reason,
        failure_time=T0,
        settings=settings or DLQSettings(),
        envelope=envelope(),
        source=KafkaSource(topic="main", partition=2, offset=41, timestamp=T0 - 1),
        retry_count=retry_count,
        user_group=user_group,
        details="boom",
    )


def test_letter_round_trips_and_keeps_original_bytes() -> None:
    env = envelope()
    lt = letter()
    back = DeadLetterMessage.from_bytes(lt.to_bytes())
    assert back == lt
    assert back.v == 1
    assert back.message_id == "m1"
    assert back.user_id == "u1"
    assert back.source_partition == 2
    assert back.source_offset == 41
    assert back.open_kfid == "kf1"
    assert back.original_bytes() == env.to_bytes()  # the retry re-produces exactly these bytes
    assert dict(back.kafka_headers()) == {
        "failure_reason": b"downstream_error",
        "retry_count": b"0",
        "message_id": b"m1",
    }


def test_letter_rejects_newer_version_and_garbage() -> None:
    data = json.loads(letter().to_bytes())
    data["v"] = 99
    with pytest.raises(EnvelopeError, match="newer"):
        DeadLetterMessage.from_bytes(json.dumps(data).encode())
    for bad in (b"", b"not json", b"[]", b'{"message_id": "x"}'):
        with pytest.raises(EnvelopeError):
            DeadLetterMessage.from_bytes(bad)


def test_poison_keeps_raw_bytes() -> None:
    lt = make_dead_letter(
        reason=FailureReason.INVALID_MESSAGE,
        failure_time=T0,
        settings=DLQSettings(),
        raw_value=b"\xff\x00garbage",
        source=KafkaSource(topic="t", partition=1, offset=7),
        user_id="u",
    )
    assert lt.message_id == "raw:t:1:7"
    assert lt.original_bytes() == b"\xff\x00garbage"
    assert not lt.recoverable
    assert lt.manual_review
    assert lt.max_retries == 0
    assert lt.suggested_action is ActionType.MANUAL_REVIEW


def test_seed_policy() -> None:
    assert [r for r in FailureReason if not is_recoverable(r)] == [
        FailureReason.INVALID_MESSAGE,
        FailureReason.STATE_TOO_LARGE,  # the same state again on retry: manual review
    ]
    assert calculate_priority(FailureReason.DOWNSTREAM_ERROR) == 5
    assert calculate_priority(FailureReason.DOWNSTREAM_ERROR, "vip") == 8
    assert calculate_priority(FailureReason.USER_BLOCKED) == 2
    assert calculate_priority(FailureReason.RATE_LIMITED) == 4
    assert calculate_priority(FailureReason.RATE_LIMITED, "vip") == 7
    assert letter(user_group="vip").priority == 8


def test_backoff_schedule_1_2_4_minutes_capped_at_an_hour() -> None:
    s = DLQSettings()
    assert [backoff_s(n, s.backoff_base_s, s.backoff_max_s) for n in range(8)] == [
        60,
        120,
        240,
        480,
        960,
        1920,
        3600,
        3600,
    ]
    assert backoff_s(500, 60, 3600) == 3600


@pytest.mark.parametrize(
    "reason",
    [
        r
        for r in FailureReason
        if r
        not in (
            FailureReason.INVALID_MESSAGE,
            FailureReason.USER_BLOCKED,
            FailureReason.STATE_TOO_LARGE,
        )
    ],
)
def test_backoff_strategies_with_injected_clock(reason: FailureReason) -> None:
    strategies = default_strategies(DLQSettings())
    for n, expected in [(0, 60), (1, 120), (2, 240), (9, 3600)]:
        d = decide(strategies, letter(reason, retry_count=n), now=T0)
        assert d.schedule
        assert d.due_s == T0 + expected
    # consumed late: the due time stays failure_time + backoff, or now if already past
    assert decide(strategies, letter(reason), now=T0 + 30).due_s == T0 + 60
    assert decide(strategies, letter(reason), now=T0 + 500).due_s == T0 + 500


def test_exhausted_retries_and_invalid_go_to_review() -> None:
    strategies = default_strategies(DLQSettings(max_retries=3))
    d = decide(strategies, letter(retry_count=3, settings=DLQSettings(max_retries=3)), now=T0)
    assert not d.schedule
    assert "exhausted" in d.why
    d = decide(strategies, letter(FailureReason.INVALID_MESSAGE), now=T0)
    assert not d.schedule
    assert "not recoverable" in d.why
    # only an operator's explicit retry reaches prepare: it re-produces the original bytes
    rec = strategies[FailureReason.INVALID_MESSAGE].prepare(letter(FailureReason.INVALID_MESSAGE))
    assert rec.value == envelope().to_bytes()


def test_blocked_user_not_before_block_ends() -> None:
    blocks = {"u1": T0 + 7200.0}
    lookups: list[str] = []

    def blocked_until(user: str) -> float | None:
        lookups.append(user)
        return blocks.get(user)

    strategies = default_strategies(DLQSettings(), blocked_until)
    for _ in range(3):  # one batch (same `now`): one lookup per user
        d = decide(strategies, letter(FailureReason.USER_BLOCKED), now=T0 + 10)
        assert d.due_s == T0 + 7200
    assert lookups == ["u1"]
    blocks["u1"] = float("inf")  # permanent block: never retried automatically
    d = decide(strategies, letter(FailureReason.USER_BLOCKED), now=T0 + 1)
    assert not d.schedule
    assert "cannot recover" in d.why
    blocks.clear()  # block lifted: plain backoff
    assert decide(strategies, letter(FailureReason.USER_BLOCKED), now=T0 + 2).due_s == T0 + 60


def test_prepare_sets_retry_headers() -> None:
    strategies = default_strategies(DLQSettings())
    rec = strategies[FailureReason.PROCESS_TIMEOUT].prepare(
        letter(FailureReason.PROCESS_TIMEOUT, 2)
    )
    h = dict(rec.headers)
    assert rec.key == b"u1"
    assert rec.value == envelope().to_bytes()
    assert h["retry_from_dlq"] == b"true"
    assert h["retry_count"] == b"3"
    assert h["original_failure"] == b"process_timeout"
    assert h["msg_id"] == b"m1"
    assert retry_count_of(rec.headers) == 3
    assert is_dlq_retry(rec.headers)
    assert not is_dlq_retry(envelope().headers())
    assert retry_count_of([("retry_count", b"3")]) == 0  # not from the DLQ


def test_park_exemptions() -> None:
    s = DLQSettings()
    assert parks_for(FailureReason.DOWNSTREAM_ERROR, s)
    assert not parks_for(FailureReason.RATE_LIMITED, s)
    assert not parks_for(FailureReason.USER_BLOCKED, s)
    assert not parks_for(FailureReason.INVALID_MESSAGE, s)
    assert parks_for(FailureReason.RATE_LIMITED, DLQSettings(park_rate_limited=True))


def test_breaker_opens_and_probes() -> None:
    now = [0.0]
    b = Breaker(failure_threshold=3, cooldown_s=60, half_open_trials=None, clock=lambda: now[0])
    for _ in range(3):
        assert b.allow()
        b.on_failure()
    assert b.state == "open"
    assert not b.allow()
    now[0] = 60.0
    assert b.state == "half_open"
    assert b.allow()
    b.on_failure()  # a failed probe re-opens at once
    assert not b.allow()
    now[0] = 121.0
    b.on_success()
    assert b.state == "closed"


def test_emergency_file_is_daily_fsynced_and_replays_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    letters = [letter() for _ in range(5)]
    path = emergency.write_letters(tmp_path, letters, T0)
    assert path.name == "dlq_emergency_20270115.jsonl"
    assert synced, "emergency writes must be fsync'd"
    with path.open("ab") as fh:  # a torn line from a crash mid-write
        fh.write(b'{"id": "torn", "letter": {')
    published: list[str] = []

    def publish(batch: list[DeadLetterMessage]) -> list[bool]:
        published.extend(lt.letter_id for lt in batch)
        return [lt.letter_id != letters[4].letter_id for lt in batch]  # one fails

    r1 = emergency.replay(tmp_path, publish, batch_size=2)
    assert (r1.published, r1.failed, r1.unreadable) == (4, 1, 1)
    assert emergency.pending_count(tmp_path) == 1
    r2 = emergency.replay(tmp_path, lambda b: [True] * len(b))
    assert (r2.published, r2.already_done) == (1, 4)
    r3 = emergency.replay(tmp_path, lambda b: [True] * len(b))
    assert r3.published == 0
    assert r3.already_done == 5
    assert sorted(published[:5]) == sorted(lt.letter_id for lt in letters)


def test_consume_dead_letter_converts_to_seed_format() -> None:
    from qywx_ray.consume.types import DeadLetter
    from qywx_ray.dlq.sink import to_dead_letter_message

    env = envelope("m7", "u7")
    host_letter = DeadLetter(
        reason="process_timeout",
        error="took 31 s",
        message_id="m7",
        user="u7",
        open_kfid="kf1",
        topic="main",
        partition=3,
        offset=99,
        timestamp_ms=1_700_000_000_123,
        value=env.to_bytes(),
        attempt=3,
    )
    lt = to_dead_letter_message(host_letter, DLQSettings(), T0)
    assert lt.failure_reason is FailureReason.PROCESS_TIMEOUT
    assert lt.retry_count == 2
    assert (lt.source_topic, lt.source_partition, lt.source_offset) == ("main", 3, 99)
    assert lt.source_timestamp == 1_700_000_000.123
    assert lt.failure_time == T0
    assert lt.original_bytes() == env.to_bytes()
    assert lt.recoverable
    poison = DeadLetter(
        reason="invalid_message",
        error="not JSON",
        message_id="main:0:5",
        user="k",
        open_kfid="",
        topic="main",
        partition=0,
        offset=5,
        timestamp_ms=0,
        value=b"\xffjunk",
    )
    lp = to_dead_letter_message(poison, DLQSettings(), T0)
    assert lp.original_bytes() == b"\xffjunk"
    assert not lp.recoverable
    assert lp.manual_review
    odd = DeadLetter(
        reason="something_new",
        error="e",
        message_id="x",
        user="u",
        open_kfid="",
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=0,
        value=env.to_bytes(),
    )
    lo = to_dead_letter_message(odd, DLQSettings(), T0)
    assert lo.failure_reason is FailureReason.DOWNSTREAM_ERROR
    assert lo.failure_details.startswith("[something_new]")

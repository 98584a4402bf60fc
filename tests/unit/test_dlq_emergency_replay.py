"""The emergency file empties itself: background replay once the DLQ topic takes writes.

Letters in the emergency file keep their users parked until they reach the DLQ topic (the
recovery actor reads only the topic), so a replay must not wait for someone to run the
CLI on that node. Fake publishers here; tests/integration/test_dlq_producer.py has the
real-broker version. No sleeps as synchronisation: events and bounded waits.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from qywx_ray.dlq import emergency
from qywx_ray.dlq.emergency import EmergencyReplayer
from qywx_ray.dlq.message import DeadLetterMessage, make_dead_letter
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.errors import ConfigError
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings, load_settings

T0 = 1_800_000_000.0
WAIT_S = 10.0


def letters(n: int, prefix: str = "m") -> list[DeadLetterMessage]:
    return [
        make_dead_letter(
            reason=FailureReason.DOWNSTREAM_ERROR,
            failure_time=T0,
            settings=DLQSettings(),
            message_id=f"{prefix}{i}",
            user_id=f"u{i}",
        )
        for i in range(n)
    ]


class FakeTopic:
    """A DLQ topic that acks what `accept` allows, and records every letter it acked."""

    def __init__(self, accept: Callable[[DeadLetterMessage], bool] = lambda _: True) -> None:
        self.accept = accept
        self.acked: list[str] = []
        self.calls = 0

    def publish(self, batch: list[DeadLetterMessage]) -> list[bool]:
        self.calls += 1
        out = [self.accept(lt) for lt in batch]
        self.acked += [lt.letter_id for lt, ok in zip(batch, out, strict=True) if ok]
        return out


# ---- settings: the directory is absolute, whatever the actor's working directory -----------


def test_default_emergency_dir_is_absolute_and_fixed_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=".qywx-data")
    assert settings.dlq_emergency_dir == tmp_path / ".qywx-data" / "dlq-emergency"
    elsewhere = tmp_path / "ray-worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # an actor runs in Ray's own working directory
    assert settings.dlq_emergency_dir == tmp_path / ".qywx-data" / "dlq-emergency"
    assert settings.dlq_emergency_dir.is_absolute()


def test_a_relative_emergency_dir_is_refused() -> None:
    with pytest.raises(ValidationError, match="absolute"):
        DLQSettings(emergency_dir="dlq-emergency")
    with pytest.raises(ConfigError, match=r"dlq\.emergency_dir"):
        load_settings(overrides={"dlq": {"emergency_dir": "relative/dir"}})
    home = DLQSettings(emergency_dir="~/qywx-dlq")
    assert Path(home.emergency_dir) == Path.home() / "qywx-dlq"


# ---- replay: crash-safe, compacting, one process at a time ---------------------------------


def test_replay_removes_a_file_only_when_every_letter_was_acked(tmp_path: Path) -> None:
    batch = letters(4)
    path = emergency.write_letters(tmp_path, batch, T0)
    refused = batch[3].letter_id
    topic = FakeTopic(lambda lt: lt.letter_id != refused)
    r1 = emergency.replay(tmp_path, topic.publish, batch_size=2)
    assert (r1.published, r1.failed, r1.removed_files) == (3, 1, 0)
    assert path.exists()
    assert emergency.pending_count(tmp_path) == 1

    topic.accept = lambda lt: True
    r2 = emergency.replay(tmp_path, topic.publish)
    assert (r2.published, r2.already_done, r2.removed_files) == (1, 3, 1)
    assert not path.exists()
    assert not emergency.done_path(path).exists()
    assert sorted(topic.acked) == sorted(lt.letter_id for lt in batch)  # each once


def test_a_crash_before_the_ack_keeps_the_letter_for_the_next_replay(tmp_path: Path) -> None:
    batch = letters(3)
    path = emergency.write_letters(tmp_path, batch, T0)

    def crash(_: list[DeadLetterMessage]) -> list[bool]:
        raise RuntimeError("process died mid-produce")

    with pytest.raises(RuntimeError):
        emergency.replay(tmp_path, crash)
    assert path.exists()
    assert emergency.pending_count(tmp_path) == 3
    topic = FakeTopic()
    report = emergency.replay(tmp_path, topic.publish)
    assert report.published == 3
    assert sorted(topic.acked) == sorted(x.letter_id for x in batch)


def test_a_file_with_an_unreadable_line_is_kept_for_a_human(tmp_path: Path) -> None:
    path = emergency.write_letters(tmp_path, letters(2), T0)
    with path.open("ab") as fh:
        fh.write(b'{"id": "torn", "letter": {')
    report = emergency.replay(tmp_path, FakeTopic().publish)
    assert (report.published, report.unreadable, report.removed_files) == (2, 1, 0)
    assert path.exists()


def test_replay_stops_early_when_the_topic_takes_nothing(tmp_path: Path) -> None:
    emergency.write_letters(tmp_path, letters(10), T0)
    topic = FakeTopic(lambda lt: False)
    report = emergency.replay(tmp_path, topic.publish, batch_size=2, stop_when_refused=True)
    assert topic.calls == 1
    assert report.failed == 2
    assert emergency.pending_count(tmp_path) == 10


def test_only_one_process_replays_a_directory_at_a_time(tmp_path: Path) -> None:
    emergency.write_letters(tmp_path, letters(3), T0)
    # Another process on this node holds the replay lock (flock: per open file).
    fd = os.open(emergency.lock_path(tmp_path), os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        topic = FakeTopic()
        report = emergency.replay(tmp_path, topic.publish, wait_for_lock=False)
        assert report.locked_out
        assert topic.calls == 0
    finally:
        os.close(fd)
    report = emergency.replay(tmp_path, topic.publish, wait_for_lock=False)
    assert not report.locked_out
    assert report.published == 3


def test_a_write_racing_with_compaction_lands_in_a_live_file(tmp_path: Path) -> None:
    """The compactor unlinks a file under its exclusive lock; a writer that opened the old
    file before that must notice (no links left) and write to the path's new file."""
    first = letters(1, "a")
    path = emergency.write_letters(tmp_path, first, T0)
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the compactor holds it
    writer = threading.Thread(
        target=emergency.write_letters, args=(tmp_path, letters(1, "b"), T0), daemon=True
    )
    writer.start()  # opens the old file (or not yet): either way must end in the new one
    path.unlink()
    os.close(fd)  # releases the lock
    writer.join(WAIT_S)
    assert not writer.is_alive()
    ids = [json.loads(x)["letter"]["message_id"] for x in path.read_text().splitlines()]
    assert ids == ["b0"]


# ---- the background loop ------------------------------------------------------------------


def test_background_replay_waits_for_the_topic_and_survives_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batch = letters(3)
    path = emergency.write_letters(tmp_path, batch, T0)
    state = {"round": 0}
    done = threading.Event()
    acked: list[str] = []

    def publish(items: list[DeadLetterMessage]) -> list[bool]:
        state["round"] += 1
        if state["round"] == 1:
            raise RuntimeError("librdkafka hiccup")  # the loop must survive this
        if state["round"] == 2:
            return [False] * len(items)  # topic still down
        acked.extend(lt.letter_id for lt in items)
        return [True] * len(items)

    def on_report(report: emergency.ReplayReport) -> None:
        if report.removed_files:
            done.set()

    caplog.set_level(logging.WARNING, logger="qywx_ray")
    replayer = EmergencyReplayer(
        tmp_path, publish, interval_s=0.01, backoff_max_s=0.05, on_report=on_report
    )
    replayer.start()
    try:
        assert done.wait(WAIT_S)
    finally:
        replayer.stop(WAIT_S)
    assert sorted(acked) == sorted(lt.letter_id for lt in batch)
    assert not path.exists()
    events = [r.getMessage() for r in caplog.records]
    assert "dlq.emergency.replay_failed" in events
    assert "dlq.emergency.replayed" in events


def test_background_replay_does_not_probe_while_the_breaker_is_open(tmp_path: Path) -> None:
    emergency.write_letters(tmp_path, letters(2), T0)
    topic = FakeTopic()
    allowed = {"now": False}
    replayer = EmergencyReplayer(
        tmp_path, topic.publish, interval_s=0.01, can_try=lambda: allowed["now"]
    )
    assert replayer.run_once() is None
    assert topic.calls == 0
    allowed["now"] = True
    report = replayer.run_once()
    assert report is not None
    assert report.published == 2
    assert replayer.run_once() is None  # nothing left: no lock, no publish
    assert topic.calls == 1

"""The emergency file: where dead letters go when the DLQ topic cannot take them.

JSON lines, one file per UTC day (`dlq_emergency_YYYYMMDD.jsonl`) in settings.dlq_emergency_dir
(always absolute), each line `{"id": letter_id, "written_at": s, "letter": {...}}`. A write
returns only after fsync (file and, on creation, its directory). A sidecar `<file>.done`
lists the ids already re-published, so replay is idempotent; a file whose every line is
done is then removed (with its sidecar), so a letter leaves the file only after the DLQ
topic acknowledged it. Letters here keep their users parked (the recovery actor reads only
the topic), so the DLQ producer's owner replays them in the background (`EmergencyReplayer`)
once the topic takes writes again; `qywx-ray dlq replay-emergency` does the same by hand.
Per node, one process replays a directory at a time (flock on `.replay.lock`); writers hold
a shared flock on the data file, so removal never loses a line appended meanwhile.
Never writes to /var/log; never drops a line it cannot parse without saying so (a file with
such a line is kept for a human).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)

FILE_PREFIX = "dlq_emergency_"
LOCK_NAME = ".replay.lock"
_lock = threading.Lock()

REPLAYED = metrics.counter(
    "qywx_dlq_emergency_replayed_total",
    "Emergency-file dead letters re-published to the DLQ topic (acknowledged)",
)

Publish = Callable[[list[DeadLetterMessage]], list[bool]]


def file_for(directory: Path, now_s: float) -> Path:
    return directory / f"{FILE_PREFIX}{time.strftime('%Y%m%d', time.gmtime(now_s))}.jsonl"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_live(path: Path) -> int:
    """An append fd on `path` under a shared flock, on the file the path names now: if
    replay removed it while we waited for the lock (no links left), open it again."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # excludes only the remover's LOCK_EX
            if os.fstat(fd).st_nlink > 0:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def append_fsynced(path: Path, lines: Sequence[bytes]) -> None:
    """Append whole lines with one write() and fsync; creates the file durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(line.rstrip(b"\n") + b"\n" for line in lines)
    with _lock:
        created = not path.exists()
        fd = _open_live(path)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the flock
        if created:
            _fsync_dir(path.parent)


def write_letters(directory: Path, letters: Sequence[DeadLetterMessage], now_s: float) -> Path:
    path = file_for(directory, now_s)
    lines = [
        json.dumps(
            {
                "id": letter.letter_id,
                "written_at": now_s,
                "letter": letter.model_dump(mode="json"),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        for letter in letters
    ]
    append_fsynced(path, lines)
    return path


@dataclass
class EmergencyEntry:
    path: Path
    entry_id: str
    letter: DeadLetterMessage


@dataclass
class ReplayReport:
    files: int = 0
    entries: int = 0
    published: int = 0
    already_done: int = 0
    failed: int = 0
    unreadable: int = 0
    failed_ids: list[str] = field(default_factory=list)
    removed_files: int = 0  # every line acknowledged: file and sidecar removed
    locked_out: bool = False  # another process was replaying this directory


def done_path(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def lock_path(directory: Path) -> Path:
    return directory / LOCK_NAME


@contextlib.contextmanager
def replay_lock(directory: Path, wait: bool = True) -> Iterator[bool]:
    """Exclusive per node and directory (flock: also between two producers in one
    process). Yields False, holding nothing, when `wait` is off and someone has it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(directory), os.O_RDWR | os.O_CREAT, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def read_done(path: Path) -> set[str]:
    marker = done_path(path)
    if not marker.exists():
        return set()
    return {line.strip() for line in marker.read_text(encoding="utf-8").splitlines() if line}


def emergency_files(directory: Path) -> list[Path]:
    if not directory.exists():
        return []
    return sorted(directory.glob(f"{FILE_PREFIX}*.jsonl"))


def read_entries(path: Path, report: ReplayReport | None = None) -> Iterator[EmergencyEntry]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                letter = DeadLetterMessage.model_validate(obj["letter"])
                entry_id = str(obj.get("id") or letter.letter_id)
            except Exception as exc:  # noqa: BLE001 - a torn last line after a crash, or hand-edited junk
                if report is not None:
                    report.unreadable += 1
                log.error(
                    "dlq.emergency.unreadable_line", file=str(path), line=lineno, error=str(exc)
                )
                continue
            yield EmergencyEntry(path, entry_id, letter)


def pending_count(directory: Path) -> int:
    """Entries in emergency files not yet re-published (for stats and alerts)."""
    total = 0
    for path in emergency_files(directory):
        done = read_done(path)
        total += sum(1 for e in read_entries(path) if e.entry_id not in done)
    return total


def replay(
    directory: Path,
    publish: Publish,
    batch_size: int = 500,
    *,
    wait_for_lock: bool = True,
    stop_when_refused: bool = False,
) -> ReplayReport:
    """Re-publish entries not yet marked done; mark each one done (fsync'd) once acked,
    and remove a file once all its lines are done. Crash-safe: an entry is marked only
    after its ack, so a crash re-publishes it (a duplicate the recovery side drops by
    message id), never loses it.

    `publish` returns, per letter, whether the DLQ topic acknowledged it. With
    `stop_when_refused`, a batch with no ack at all ends the replay (the topic is still
    down: the rest would only wait for the same timeout). Without `wait_for_lock`, a
    replay running elsewhere on this node makes this one return at once (`locked_out`).
    """
    report = ReplayReport()
    if not emergency_files(directory):
        return report
    with replay_lock(directory, wait=wait_for_lock) as held:
        if not held:
            report.locked_out = True
            return report
        for path in emergency_files(directory):
            if not _replay_file(path, publish, batch_size, report, stop_when_refused):
                break
    return report


def _replay_file(  # noqa: C901 - the nested flush closure's branches count here
    path: Path, publish: Publish, batch_size: int, report: ReplayReport, stop_when_refused: bool
) -> bool:
    """False: the topic refused a whole batch and `stop_when_refused` is on."""
    report.files += 1
    done = read_done(path)
    unreadable_before = report.unreadable
    batch: list[EmergencyEntry] = []
    seen: set[str] = set()
    pending = 0

    def flush(batch: list[EmergencyEntry]) -> bool:
        nonlocal pending
        if not batch:
            return True
        acked = publish([e.letter for e in batch])
        ok = [e.entry_id for e, a in zip(batch, acked, strict=True) if a]
        for e, a in zip(batch, acked, strict=True):
            if not a:
                pending += 1
                report.failed += 1
                report.failed_ids.append(e.entry_id)
        if ok:
            append_fsynced(done_path(path), [i.encode() for i in ok])
            REPLAYED.inc(len(ok))
        report.published += len(ok)
        return bool(ok) or not stop_when_refused

    for entry in read_entries(path, report):
        report.entries += 1
        if entry.entry_id in done or entry.entry_id in seen:
            report.already_done += 1
            continue
        seen.add(entry.entry_id)
        batch.append(entry)
        if len(batch) >= batch_size:
            if not flush(batch):
                return False
            batch = []
    if not flush(batch):
        return False
    if pending == 0 and report.unreadable == unreadable_before and _remove_if_done(path):
        report.removed_files += 1
    return True


def _remove_if_done(path: Path) -> bool:
    """Remove a file whose every line is done, under its exclusive flock (writers hold a
    shared one and re-open a removed file), checking again under the lock: a line
    appended after our read keeps the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = read_done(path)
        report = ReplayReport()
        if any(e.entry_id not in done for e in read_entries(path, report)) or report.unreadable:
            return False
        path.unlink()
        done_path(path).unlink(missing_ok=True)
        _fsync_dir(path.parent)
    finally:
        os.close(fd)
    log.warning("dlq.emergency.file_removed", file=str(path), letters=len(done))
    return True


class EmergencyReplayer:
    """Replays the emergency directory in the background: on a daemon thread, every
    `interval_s` while there are files, when `can_try()` (the producer's breaker is not
    open); a round the topic refuses, or any exception, backs off (doubling up to
    `backoff_max_s`) and the loop goes on: it must never die while letters wait."""

    def __init__(
        self,
        directory: Path,
        publish: Publish,
        *,
        interval_s: float,
        backoff_max_s: float = 60.0,
        batch_size: int = 500,
        can_try: Callable[[], bool] = lambda: True,
        on_report: Callable[[ReplayReport], None] | None = None,
    ) -> None:
        self.directory = directory
        self.publish = publish
        self.interval_s = interval_s
        self.backoff_max_s = max(backoff_max_s, interval_s)
        self.batch_size = batch_size
        self.can_try = can_try
        self.on_report = on_report
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> EmergencyReplayer:
        self._thread = threading.Thread(target=self._loop, name="dlq-emergency-replay", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run_once(self) -> ReplayReport | None:
        """One round; None when there was nothing to do or the breaker said wait."""
        if not emergency_files(self.directory) or not self.can_try():
            return None
        report = replay(
            self.directory,
            self.publish,
            self.batch_size,
            wait_for_lock=False,
            stop_when_refused=True,
        )
        if report.locked_out:
            return report
        if report.published or report.removed_files:
            log.warning(
                "dlq.emergency.replayed",
                directory=str(self.directory),
                published=report.published,
                already_done=report.already_done,
                failed=report.failed,
                unreadable=report.unreadable,
                removed_files=report.removed_files,
            )
        elif report.failed:
            log.warning(
                "dlq.emergency.replay_refused", directory=str(self.directory), failed=report.failed
            )
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _loop(self) -> None:
        delay_s = self.interval_s
        while not self._stop.wait(delay_s):
            try:
                report = self.run_once()
            except Exception as exc:
                delay_s = min(max(delay_s, self.interval_s) * 2, self.backoff_max_s)
                log.error(
                    "dlq.emergency.replay_failed",
                    exc_info=True,
                    directory=str(self.directory),
                    error=str(exc),
                    retry_in_s=delay_s,
                )
                continue
            refused = report is not None and report.failed > 0
            delay_s = min(delay_s * 2, self.backoff_max_s) if refused else self.interval_s

"""The emergency file: where dead letters go when the DLQ topic cannot take them.

JSON lines, one file per UTC day (`dlq_emergency_YYYYMMDD.jsonl`) in settings.dlq_emergency_dir,
each line `{"id": letter_id, "written_at": s, "letter": {...}}`. A write returns only after
fsync (file and, on creation, its directory). A sidecar `<file>.done` lists the ids already
re-published, so replay is idempotent. Never writes to /var/log; never drops a line it
cannot parse without saying so.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)

FILE_PREFIX = "dlq_emergency_"
_lock = threading.Lock()


def file_for(directory: Path, now_s: float) -> Path:
    return directory / f"{FILE_PREFIX}{time.strftime('%Y%m%d', time.gmtime(now_s))}.jsonl"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_fsynced(path: Path, lines: Sequence[bytes]) -> None:
    """Append whole lines with one write() and fsync; creates the file durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    data = b"".join(line.rstrip(b"\n") + b"\n" for line in lines)
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
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


def done_path(path: Path) -> Path:
    return path.with_name(path.name + ".done")


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
            except Exception as exc:  # a torn last line after a crash, or hand-edited junk
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
    publish: Callable[[list[DeadLetterMessage]], list[bool]],
    batch_size: int = 500,
) -> ReplayReport:
    """Re-publish entries not yet marked done; mark each one done (fsync'd) once acked.

    `publish` returns, per letter, whether the DLQ topic acknowledged it.
    """
    report = ReplayReport()
    for path in emergency_files(directory):
        report.files += 1
        done = read_done(path)
        batch: list[EmergencyEntry] = []
        seen: set[str] = set()

        def flush(batch: list[EmergencyEntry], path: Path = path) -> None:
            if not batch:
                return
            acked = publish([e.letter for e in batch])
            ok = [e.entry_id for e, a in zip(batch, acked, strict=True) if a]
            for e, a in zip(batch, acked, strict=True):
                if not a:
                    report.failed += 1
                    report.failed_ids.append(e.entry_id)
            if ok:
                append_fsynced(done_path(path), [i.encode() for i in ok])
            report.published += len(ok)

        for entry in read_entries(path, report):
            report.entries += 1
            if entry.entry_id in done or entry.entry_id in seen:
                report.already_done += 1
                continue
            seen.add(entry.entry_id)
            batch.append(entry)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        flush(batch)
    return report

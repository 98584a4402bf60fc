"""Per-partition commit watermarks: which offset is safe to commit.

Messages of one partition finish in any order (different users run in parallel), but a
Kafka commit of offset N means "everything below N is done". So we commit only the
smallest offset that is still in flight (or one past the highest seen when none is).
This module must never return an offset above an unfinished one. Pure: no Kafka, no clock
(callers pass `now_s`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class PartitionWatermark:
    """In-flight offsets of one partition, added in increasing order, done in any order."""

    def __init__(self, start: int | None = None) -> None:
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._inflight: set[int] = set()
        self._next: int | None = start  # one past the highest offset seen
        self.committed: int | None = None  # last offset we asked Kafka to commit

    def add(self, offset: int) -> bool:
        """Track a delivered offset; False if it is not newer than what we saw (a replay)."""
        if self._next is not None and offset < self._next:
            return False
        self._order.append(offset)
        self._inflight.add(offset)
        self._next = offset + 1
        return True

    def done(self, offset: int) -> bool:
        """Mark an in-flight offset done; False (ignored) if it is not in flight."""
        if offset not in self._inflight:
            return False
        self._inflight.discard(offset)
        self._done.add(offset)
        while self._order and self._order[0] in self._done:
            self._done.discard(self._order.popleft())
        return True

    def committable(self) -> int | None:
        """Smallest undone offset, or one past the highest seen; None before any offset."""
        if self._order:
            return self._order[0]
        return self._next

    def pending_commit(self) -> int | None:
        """The offset to commit now, or None when nothing advanced since the last commit."""
        c = self.committable()
        if c is None or (self.committed is not None and c <= self.committed):
            return None
        return c

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def is_inflight(self, offset: int) -> bool:
        return offset in self._inflight


@dataclass
class CommitPolicy:
    """Batch commits: commit when `every_messages` finished or `interval_s` passed."""

    every_messages: int = 1000
    interval_s: float = 1.0
    _since: int = field(default=0, init=False)
    _last_s: float | None = field(default=None, init=False)

    def record_done(self, n: int = 1) -> None:
        self._since += n

    def due(self, now_s: float) -> bool:
        if self._last_s is None:
            self._last_s = now_s
        if self._since == 0:
            return False
        return self._since >= self.every_messages or now_s - self._last_s >= self.interval_s

    def committed(self, now_s: float) -> None:
        self._since = 0
        self._last_s = now_s


class WatermarkTable:
    """Watermarks of every partition a consumer owns, keyed by (topic, partition)."""

    def __init__(self) -> None:
        self._marks: dict[tuple[str, int], PartitionWatermark] = {}

    def get(self, topic: str, partition: int) -> PartitionWatermark:
        key = (topic, partition)
        mark = self._marks.get(key)
        if mark is None:
            mark = self._marks[key] = PartitionWatermark()
        return mark

    def done(self, topic: str, partition: int, offset: int) -> bool:
        mark = self._marks.get((topic, partition))
        return mark.done(offset) if mark is not None else False

    def drop(self, topic: str, partition: int) -> PartitionWatermark | None:
        return self._marks.pop((topic, partition), None)

    def pending_commits(self) -> dict[tuple[str, int], int]:
        out = {}
        for key, mark in self._marks.items():
            c = mark.pending_commit()
            if c is not None:
                out[key] = c
        return out

    def mark_committed(self, offsets: dict[tuple[str, int], int]) -> None:
        for key, offset in offsets.items():
            mark = self._marks.get(key)
            if mark is not None and (mark.committed is None or offset > mark.committed):
                mark.committed = offset

    def inflight(self, topic: str | None = None, partition: int | None = None) -> int:
        if topic is not None and partition is not None:
            mark = self._marks.get((topic, partition))
            return mark.inflight if mark else 0
        return sum(m.inflight for m in self._marks.values())

    def keys(self) -> list[tuple[str, int]]:
        return list(self._marks)

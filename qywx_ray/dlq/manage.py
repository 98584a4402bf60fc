"""Operator actions on dead letters (DLQManager in the original design), for the admin API and CLI.

Reads the Redis index; manual retries go through the same durable delay queue (due now),
so the recovery scheduler re-produces them exactly like automatic retries. Purge removes
only letters whose TTL has passed. Never produces to Kafka itself.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from qywx_ray.dlq import emergency
from qywx_ray.dlq.delay_queue import DelayQueue
from qywx_ray.dlq.index import MANUAL_REVIEW, SCHEDULED, DLQIndex, UndecodableLetter
from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.errors import EnvelopeError
from qywx_ray.obs.logging import get_logger
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings

log = get_logger(__name__)

Clock = Callable[[], float]
ExportFormat = Literal["csv", "jsonl"]

CSV_COLUMNS = (
    "message_id",
    "status",
    "user_id",
    "open_kfid",
    "failure_reason",
    "failure_details",
    "failure_time",
    "retry_count",
    "max_retries",
    "next_retry_time",
    "priority",
    "recoverable",
    "manual_review",
    "source_topic",
    "source_partition",
    "source_offset",
)
UNDECODABLE = "undecodable"  # the export's status for a record that is not a dead letter

# OWASP CSV injection: a cell starting with one of these is a formula in a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A CSV cell that a spreadsheet shows as text: prefix ' to a string that starts like a
    formula (customer text reaches failure_details and user ids). Numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


class DLQFilter(BaseModel):
    """A typo in a batch-retry filter must fail loudly, not widen the filter to everything."""

    model_config = ConfigDict(extra="forbid")

    user: str | None = Field(default=None, min_length=1, max_length=256)
    reason: FailureReason | None = None
    status: Literal["scheduled", "retried", "manual_review"] | None = None
    limit: int = Field(default=1000, ge=1, le=100_000)


class RetryResult(BaseModel):
    message_id: str
    result: Literal["scheduled", "not_found", "busy", "undecodable"]


class DLQManager:
    def __init__(self, settings: Settings, client: redis.Redis, *, clock: Clock = time.time):
        self.settings = settings
        self.clock = clock
        self.index = DLQIndex(client, settings.dlq.redis_prefix)
        self.queue = DelayQueue(client, settings.dlq.redis_prefix)

    def stats(self) -> dict[str, Any]:
        waiting, inflight = self.queue.counts()
        return {
            "total": self.index.total(),
            "by_reason": self.index.reason_counts([r.value for r in FailureReason]),
            "by_status": self.index.status_counts(),
            "scheduled_waiting": waiting,
            "scheduled_inflight": inflight,
            "manual_review_pending": self.index.review_count(),
            "emergency_pending": emergency.pending_count(self.settings.dlq_emergency_dir),
        }

    def iter_entries(
        self, flt: DLQFilter
    ) -> Iterator[tuple[DeadLetterMessage | UndecodableLetter, str]]:
        """Matching records, undecodable ones included (they count toward the limit)."""
        reason = flt.reason.value if flt.reason else None
        for n, item in enumerate(
            self.index.iter_letters(user=flt.user, reason=reason, status=flt.status)
        ):
            if n >= flt.limit:
                return
            yield item

    def iter_letters(self, flt: DLQFilter) -> Iterator[tuple[DeadLetterMessage, str]]:
        """Only the letters that decode; each skipped record is logged."""
        for letter, status in self.iter_entries(flt):
            if isinstance(letter, UndecodableLetter):
                log.warning(
                    "dlq.undecodable", message_id=letter.message_id, error=letter.error[:200]
                )
                continue
            yield letter, status

    def list(self, flt: DLQFilter) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.listing(flt)["messages"]
        return messages

    def listing(self, flt: DLQFilter) -> dict[str, Any]:
        """Letters that decode, plus the records that do not (id, status, why), counted."""
        messages: list[dict[str, Any]] = []
        undecodable: list[dict[str, Any]] = []
        for letter, status in self.iter_entries(flt):
            if isinstance(letter, UndecodableLetter):
                undecodable.append(
                    {"message_id": letter.message_id, "status": status, "error": letter.error}
                )
            else:
                messages.append({**letter.model_dump(mode="json"), "status": status})
        if undecodable:
            log.warning("dlq.undecodable_listed", count=len(undecodable))
        return {
            "count": len(messages),
            "messages": messages,
            "undecodable_count": len(undecodable),
            "undecodable": undecodable,
        }

    def retry(self, message_id: str, *, actor: str = "admin") -> RetryResult:
        try:
            found = self.index.get(message_id)
        except EnvelopeError as exc:
            log.warning("dlq.retry_undecodable", message_id=message_id, error=str(exc)[:200])
            return RetryResult(message_id=message_id, result="undecodable")
        if found is None:
            return RetryResult(message_id=message_id, result="not_found")
        letter, _status = found
        now = self.clock()
        letter = letter.model_copy(update={"next_retry_time": now, "manual_review": False})
        if not self.queue.set_due(letter.entry_id(), now, letter.to_bytes()):
            return RetryResult(message_id=message_id, result="busy")
        self.index.record([letter], [])
        log.warning("dlq.manual_retry", message_id=message_id, actor=actor)
        return RetryResult(message_id=message_id, result="scheduled")

    def batch_retry(self, flt: DLQFilter, *, actor: str = "admin") -> int:
        ids = [letter.message_id for letter, _ in self.iter_letters(flt)]
        done = sum(1 for mid in ids if self.retry(mid, actor=actor).result == "scheduled")
        log.warning("dlq.batch_retry", count=done, actor=actor, filter=flt.model_dump(mode="json"))
        return done

    def purge_expired(self, *, actor: str = "admin", chunk: int = 500) -> int:
        """Forget letters past their TTL (and their waiting retries); never touches in-flight."""
        now = self.clock()
        purged = 0
        candidates = self.index.expired_before(now, limit=1_000_000)
        for start in range(0, len(candidates), chunk):
            expired: list[DeadLetterMessage] = []
            for mid in candidates[start : start + chunk]:
                try:
                    found = self.index.get(mid)
                except EnvelopeError:
                    continue  # shown as undecodable by list/export; an operator decides
                if found is not None and found[0].expires_at() <= now:
                    expired.append(found[0])
            self.queue.remove([lt.entry_id() for lt in expired])
            self.index.forget(expired)
            purged += len(expired)
        log.warning("dlq.purged", count=purged, actor=actor)
        return purged

    def export(self, flt: DLQFilter, fmt: ExportFormat) -> Iterator[bytes]:
        """Rows as they are read from Redis (chunks of 500), never the whole set in memory.
        A record that does not decode is a row with status "undecodable" and the reason in
        failure_details; CSV cells are escaped against formula injection (csv_cell)."""
        if fmt == "jsonl":
            for letter, status in self.iter_entries(flt):
                yield (
                    json.dumps(
                        self._row(letter, status), ensure_ascii=False, separators=(",", ":")
                    ).encode()
                    + b"\n"
                )
            return
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        for n, (letter, status) in enumerate(self.iter_entries(flt)):
            data = self._row(letter, status)
            writer.writerow([csv_cell("" if data.get(c) is None else data[c]) for c in CSV_COLUMNS])
            if n % 200 == 199:
                yield buf.getvalue().encode()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue().encode()

    @staticmethod
    def _row(letter: DeadLetterMessage | UndecodableLetter, status: str) -> dict[str, Any]:
        if isinstance(letter, UndecodableLetter):
            return {
                "message_id": letter.message_id,
                "status": UNDECODABLE,
                "stored_status": status,
                "failure_details": letter.error,
            }
        return {**letter.model_dump(mode="json"), "status": status}


__all__ = [
    "MANUAL_REVIEW",
    "SCHEDULED",
    "UNDECODABLE",
    "DLQFilter",
    "DLQManager",
    "RetryResult",
    "csv_cell",
]

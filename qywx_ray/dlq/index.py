"""The Redis index of dead letters that the admin API and CLI read, and the manual-review set.

Keys (prefix p): `p:letters` hash message_id→latest letter JSON, `p:status` hash
message_id→status, `p:by_user:{user}` / `p:by_reason:{reason}` sets, `p:by_time` zset
message_id→failure_time, `p:review` hash message_id→letter JSON (manual review pending).
Written in one MULTI round trip per batch. It is a view for operators: it never decides
whether a retry happens (the delay queue does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import redis

from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.errors import EnvelopeError

SCHEDULED = "scheduled"
RETRIED = "retried"
MANUAL_REVIEW = "manual_review"
STATUSES = (SCHEDULED, RETRIED, MANUAL_REVIEW)


@dataclass(frozen=True, slots=True)
class UndecodableLetter:
    """An indexed record that is not a valid dead letter (corrupt, or written by another
    version). Readers show it as such instead of failing the whole listing or export."""

    message_id: str
    error: str


class DLQIndex:
    def __init__(self, client: redis.Redis, prefix: str = "qywx:dlq") -> None:
        self._r = client
        self.p = prefix
        self.letters = f"{prefix}:letters"
        self.status = f"{prefix}:status"
        self.by_time = f"{prefix}:by_time"
        self.review = f"{prefix}:review"

    def user_key(self, user: str) -> str:
        return f"{self.p}:by_user:{user}"

    def reason_key(self, reason: str) -> str:
        return f"{self.p}:by_reason:{reason}"

    def record(
        self,
        scheduled: Sequence[DeadLetterMessage],
        review: Sequence[DeadLetterMessage],
    ) -> None:
        """Index letters (latest letter per message wins) and fill the review set."""
        if not scheduled and not review:
            return
        pipe = self._r.pipeline(transaction=True)
        for letters, status in ((scheduled, SCHEDULED), (review, MANUAL_REVIEW)):
            for letter in letters:
                body = letter.to_bytes()
                mid = letter.message_id
                pipe.hset(self.letters, mid, body)
                pipe.hset(self.status, mid, status)
                pipe.sadd(self.user_key(letter.user_id), mid)
                pipe.sadd(self.reason_key(letter.failure_reason.value), mid)
                pipe.zadd(self.by_time, {mid: letter.failure_time})
                if status == MANUAL_REVIEW:
                    pipe.hset(self.review, mid, body)
                else:
                    pipe.hdel(self.review, mid)
        pipe.execute()

    def mark(self, message_ids: Sequence[str], status: str) -> None:
        if not message_ids:
            return
        pipe = self._r.pipeline(transaction=True)
        for mid in message_ids:
            pipe.hset(self.status, mid, status)
            if status != MANUAL_REVIEW:
                pipe.hdel(self.review, mid)
        pipe.execute()

    def get(self, message_id: str) -> tuple[DeadLetterMessage, str] | None:
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(self.letters, message_id)
        pipe.hget(self.status, message_id)
        body, status = pipe.execute()
        if body is None:
            return None
        return DeadLetterMessage.from_bytes(body), (status or b"").decode()

    def forget(self, letters: Sequence[DeadLetterMessage]) -> None:
        if not letters:
            return
        pipe = self._r.pipeline(transaction=True)
        for letter in letters:
            mid = letter.message_id
            pipe.hdel(self.letters, mid)
            pipe.hdel(self.status, mid)
            pipe.hdel(self.review, mid)
            pipe.srem(self.user_key(letter.user_id), mid)
            pipe.srem(self.reason_key(letter.failure_reason.value), mid)
            pipe.zrem(self.by_time, mid)
        pipe.execute()

    def review_count(self) -> int:
        return int(self._r.hlen(self.review))

    def total(self) -> int:
        return int(self._r.hlen(self.letters))

    def reason_counts(self, reasons: Sequence[str]) -> dict[str, int]:
        pipe = self._r.pipeline(transaction=False)
        for reason in reasons:
            pipe.scard(self.reason_key(reason))
        return {r: int(n) for r, n in zip(reasons, pipe.execute(), strict=True)}

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for _, status in self._r.hscan_iter(self.status, count=1000):
            key = status.decode()
            counts[key] = counts.get(key, 0) + 1
        return counts

    def iter_ids(
        self, *, user: str | None = None, reason: str | None = None, chunk: int = 500
    ) -> Iterator[str]:
        """Message ids matching the filter, newest first when unfiltered (by failure time)."""
        if user is not None and reason is not None:
            members = cast(
                set[bytes], self._r.sinter([self.user_key(user), self.reason_key(reason)])
            )
            yield from sorted(m.decode() for m in members)
            return
        if user is not None or reason is not None:
            key = self.user_key(user) if user is not None else self.reason_key(str(reason))
            for member in self._r.sscan_iter(key, count=chunk):
                yield member.decode()
            return
        start = 0
        while True:
            ids = cast(list[bytes], self._r.zrevrange(self.by_time, start, start + chunk - 1))
            if not ids:
                return
            for mid in ids:
                yield mid.decode()
            start += chunk

    def iter_letters(
        self,
        *,
        user: str | None = None,
        reason: str | None = None,
        status: str | None = None,
        chunk: int = 500,
    ) -> Iterator[tuple[DeadLetterMessage | UndecodableLetter, str]]:
        """Matching records with their status; a record that does not decode is yielded
        as an UndecodableLetter, so one bad record never hides the others."""
        buf: list[str] = []

        def fetch(ids: list[str]) -> Iterator[tuple[DeadLetterMessage | UndecodableLetter, str]]:
            pipe = self._r.pipeline(transaction=False)
            pipe.hmget(self.letters, ids)
            pipe.hmget(self.status, ids)
            bodies, statuses = pipe.execute()
            for mid, body, st in zip(ids, bodies, statuses, strict=True):
                if body is None:
                    continue
                st_text = (st or b"").decode(errors="replace")
                if status is not None and st_text != status:
                    continue
                try:
                    yield DeadLetterMessage.from_bytes(body), st_text
                except EnvelopeError as exc:
                    yield UndecodableLetter(mid, str(exc)[:500]), st_text

        for mid in self.iter_ids(user=user, reason=reason, chunk=chunk):
            buf.append(mid)
            if len(buf) >= chunk:
                yield from fetch(buf)
                buf = []
        if buf:
            yield from fetch(buf)

    def expired_before(self, cutoff_s: float, limit: int = 10_000) -> list[str]:
        """Ids whose failure time is older than `cutoff_s` (candidates for TTL purge)."""
        return [
            m.decode()
            for m in cast(
                list[bytes], self._r.zrangebyscore(self.by_time, "-inf", cutoff_s, 0, limit)
            )
        ]

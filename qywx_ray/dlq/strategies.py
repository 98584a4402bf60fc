"""Recovery strategies: when, and whether, a dead letter is retried.

Pure logic: no Redis, no Kafka, no clock of its own (`now` is always passed in).
A strategy never schedules a retry earlier than its backoff or the end of a user's block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.envelope import Headers, header_value
from qywx_ray.reasons import FailureReason


class BlockedUntil(Protocol):
    """Returns the epoch second a user's block ends, or None if not blocked.

    The protection engineer's RateLimiter.status can be adapted to this.
    """

    def __call__(self, user_id: str, /) -> float | None: ...


@dataclass(frozen=True)
class RetryRecord:
    """What the scheduler re-produces to the main topic."""

    key: bytes
    value: bytes
    headers: Headers


class RecoveryStrategy(Protocol):
    def can_recover(self, letter: DeadLetterMessage, now: float) -> bool: ...

    def retry_delay(self, letter: DeadLetterMessage, now: float) -> float:
        """Seconds from `now` until the retry may fire (0 = due now)."""
        ...

    def prepare(self, letter: DeadLetterMessage) -> RetryRecord: ...

    def on_success(self, letter: DeadLetterMessage) -> None: ...

    def on_failure(self, letter: DeadLetterMessage, error: str) -> None: ...


def backoff_s(retry_count: int, base_s: float, max_s: float) -> float:
    """1, 2, 4 … × base, capped at max (defaults: 1 min, 2 min, 4 min … ≤ 1 h)."""
    if retry_count >= 64:
        return max_s
    return float(min(max_s, base_s * (2**retry_count)))


def prepare_retry(letter: DeadLetterMessage) -> RetryRecord:
    """The original envelope bytes, key = user, with the retry headers the host reads."""
    headers: Headers = []
    original = letter.original_message or {}
    if original.get("msgtype") is not None:
        headers.append(("msg_type", str(original["msgtype"]).encode()))
    headers += [
        ("msg_id", letter.message_id.encode()),
        ("retry_from_dlq", b"true"),
        ("retry_count", str(letter.retry_count + 1).encode()),
        ("original_failure", letter.failure_reason.value.encode()),
    ]
    if original.get("ingest_ts_ms") is not None:
        headers.append(("timestamp", str(int(original["ingest_ts_ms"]) // 1000).encode()))
    if original.get("v") is not None:
        headers.append(("v", str(original["v"]).encode()))
    return RetryRecord(key=letter.user_id.encode(), value=letter.original_bytes(), headers=headers)


def is_dlq_retry(headers: Headers | None) -> bool:
    """Whether a consumed record came back from the DLQ (pass `is_retry` to admit_batch)."""
    return header_value(headers, "retry_from_dlq") == "true"


def retry_count_of(headers: Headers | None) -> int:
    """The retry_count a host must put in a new dead letter for a record it consumed."""
    value = header_value(headers, "retry_count")
    if not is_dlq_retry(headers) or value is None:
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


class _RetryHooks:
    """What every strategy does alike: re-produce the original envelope, no bookkeeping on
    the retry's outcome (the host's next dead letter, if any, carries it)."""

    def prepare(self, letter: DeadLetterMessage) -> RetryRecord:
        return prepare_retry(letter)

    def on_success(self, letter: DeadLetterMessage) -> None:
        return None

    def on_failure(self, letter: DeadLetterMessage, error: str) -> None:
        return None


class BackoffRecovery(_RetryHooks):
    """Exponential backoff from the failure time; gives up after max_retries."""

    def __init__(self, settings: DLQSettings) -> None:
        self.base_s = settings.backoff_base_s
        self.max_s = settings.backoff_max_s

    def can_recover(self, letter: DeadLetterMessage, now: float) -> bool:
        return letter.recoverable and letter.retry_count < letter.max_retries

    def retry_delay(self, letter: DeadLetterMessage, now: float) -> float:
        due = letter.failure_time + backoff_s(letter.retry_count, self.base_s, self.max_s)
        return max(0.0, due - now)


class BlockedUserRecovery(BackoffRecovery):
    """Like backoff, but never before the user's block ends."""

    def __init__(self, settings: DLQSettings, blocked_until: BlockedUntil | None) -> None:
        super().__init__(settings)
        self.blocked_until = blocked_until
        self._memo: tuple[float, dict[str, float | None]] = (float("nan"), {})

    def _until(self, user: str, now: float) -> float | None:
        """One lookup per user per `now` (a consumed batch shares one `now`)."""
        if self.blocked_until is None:
            return None
        at, memo = self._memo
        if at != now:
            memo = {}
            self._memo = (now, memo)
        if user not in memo:
            memo[user] = self.blocked_until(user)
        return memo[user]

    def can_recover(self, letter: DeadLetterMessage, now: float) -> bool:
        if not super().can_recover(letter, now):
            return False
        until = self._until(letter.user_id, now)
        return until is None or math.isfinite(until)  # a permanent block: manual review

    def retry_delay(self, letter: DeadLetterMessage, now: float) -> float:
        delay = super().retry_delay(letter, now)
        until = self._until(letter.user_id, now)
        if until is not None:
            delay = max(delay, until - now)
        return max(0.0, delay)


class NotRecoverable(_RetryHooks):
    """Invalid messages: never retried automatically, always manual review.

    `prepare` is reached only when an operator explicitly retries such a letter.
    """

    def can_recover(self, letter: DeadLetterMessage, now: float) -> bool:
        return False

    def retry_delay(self, letter: DeadLetterMessage, now: float) -> float:
        return 0.0


def default_strategies(
    settings: DLQSettings, blocked_until: BlockedUntil | None = None
) -> dict[FailureReason, RecoveryStrategy]:
    backoff = BackoffRecovery(settings)
    strategies: dict[FailureReason, RecoveryStrategy] = {r: backoff for r in FailureReason}
    strategies[FailureReason.USER_BLOCKED] = BlockedUserRecovery(settings, blocked_until)
    strategies[FailureReason.INVALID_MESSAGE] = NotRecoverable()
    strategies[FailureReason.STATE_TOO_LARGE] = NotRecoverable()
    return strategies


@dataclass(frozen=True)
class Decision:
    """schedule at `due_s`, or send to manual review with `why`."""

    schedule: bool
    due_s: float = 0.0
    why: str = ""


def decide(
    strategies: dict[FailureReason, RecoveryStrategy], letter: DeadLetterMessage, now: float
) -> Decision:
    strategy = strategies.get(letter.failure_reason)
    if strategy is None:
        return Decision(False, why=f"no strategy for {letter.failure_reason.value}")
    if not strategy.can_recover(letter, now):
        if not letter.recoverable:
            return Decision(False, why=f"{letter.failure_reason.value} is not recoverable")
        if letter.retry_count >= letter.max_retries:
            return Decision(
                False, why=f"retries exhausted ({letter.retry_count}/{letter.max_retries})"
            )
        return Decision(False, why=f"{letter.failure_reason.value}: cannot recover now")
    return Decision(True, due_s=now + strategy.retry_delay(letter, now))

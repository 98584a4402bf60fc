"""The dead-letter record (versioned JSON on the DLQ topic) and the retry policy, pure.

A DeadLetterMessage carries the original envelope in full plus every Kafka coordinate,
so a retry re-produces exactly the bytes that failed. This module never does I/O.
Times are Unix epoch seconds (float); `ttl_s` is a duration in seconds.
"""

from __future__ import annotations

import base64
import json
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.envelope import Envelope, Headers
from qywx_ray.errors import EnvelopeError

# Re-exported: the reason was defined here before qywx_ray/reasons.py held them all.
from qywx_ray.reasons import FailureReason as FailureReason

DLQ_MESSAGE_VERSION = 1


class ActionType(StrEnum):
    AUTO_RETRY = "auto_retry"
    DELAYED_RETRY = "delayed_retry"
    MANUAL_REVIEW = "manual_review"
    DISCARD = "discard"
    ESCALATE = "escalate"


class KafkaSource(BaseModel):
    """Where the failed record was read from."""

    topic: str = ""
    partition: int = -1
    offset: int = -1
    timestamp: float = 0.0  # epoch seconds


class DeadLetterMessage(BaseModel):
    v: int = DLQ_MESSAGE_VERSION
    letter_id: str = Field(default_factory=lambda: uuid.uuid4().hex)  # one per dead-lettering
    # The original message, complete. `original_raw_b64` holds undecodable (poison) bytes.
    original_message: dict[str, Any] | None = None
    original_raw_b64: str | None = None
    message_id: str = Field(min_length=1)  # the WeCom msgid (what consumers deduplicate on)
    # Failure context.
    failure_reason: FailureReason
    failure_details: str = ""
    failure_time: float
    processor_id: str = ""
    node_id: str = ""
    # Retries: retry_count = retries already attempted before this failure.
    retry_count: int = Field(default=0, ge=0)
    last_retry_time: float | None = None
    next_retry_time: float | None = None
    # Kafka metadata.
    source_topic: str = ""
    source_partition: int = -1
    source_offset: int = -1
    source_timestamp: float = 0.0
    # Business metadata.
    user_id: str = ""
    user_group: str = "normal"
    open_kfid: str = ""
    session_id: str = ""
    # Policy.
    recoverable: bool = True
    priority: int = Field(default=5, ge=1, le=10)
    max_retries: int = Field(default=10, ge=0)
    ttl_s: float = 7 * 86_400.0
    suggested_action: ActionType = ActionType.DELAYED_RETRY
    manual_review: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":")
        ).encode()

    @classmethod
    def from_bytes(cls, value: bytes | str | None) -> DeadLetterMessage:
        if not value:
            raise EnvelopeError("empty dead-letter record")
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvelopeError(f"dead letter is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise EnvelopeError("dead letter is not a JSON object")
        version = data.get("v", 1)
        if not isinstance(version, int) or version > DLQ_MESSAGE_VERSION:
            raise EnvelopeError(
                f"dead-letter version {version!r} is newer than this reader ({DLQ_MESSAGE_VERSION})"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EnvelopeError(f"not a valid dead letter: {exc}") from exc

    def kafka_headers(self) -> Headers:
        return [
            ("failure_reason", self.failure_reason.value.encode()),
            ("retry_count", str(self.retry_count).encode()),
            ("message_id", self.message_id.encode()),
        ]

    def original_bytes(self) -> bytes:
        """The original record value, byte for byte as Envelope.to_bytes wrote it."""
        if self.original_message is not None:
            return json.dumps(
                self.original_message, ensure_ascii=False, separators=(",", ":")
            ).encode()
        if self.original_raw_b64 is not None:
            return base64.b64decode(self.original_raw_b64)
        return b""

    def expires_at(self) -> float:
        return self.failure_time + self.ttl_s

    def entry_id(self) -> str:
        """Delay-queue id: the same letter scheduled twice (DLQ redelivery) is one entry."""
        return f"{self.message_id}:{self.retry_count}"


# ---- the retry policy (pure; the original design's) -----------------------------------

_NOT_RECOVERABLE = frozenset({FailureReason.INVALID_MESSAGE, FailureReason.STATE_TOO_LARGE})


def is_recoverable(reason: FailureReason) -> bool:
    """Transient problems are recoverable; a malformed message is not (as the original
    design's isRecoverable)."""
    return reason not in _NOT_RECOVERABLE


def calculate_priority(reason: FailureReason, user_group: str = "normal") -> int:
    """Seed calculatePriority: 5, VIP +3, blocked -3, rate-limited -1, clamped to 1..10."""
    priority = 5
    if user_group == "vip":
        priority += 3
    if reason is FailureReason.USER_BLOCKED:
        priority -= 3
    elif reason is FailureReason.RATE_LIMITED:
        priority -= 1
    return max(1, min(10, priority))


def max_retries_for(reason: FailureReason, settings: DLQSettings) -> int:
    return settings.max_retries if is_recoverable(reason) else 0


def suggest_action(reason: FailureReason) -> ActionType:
    if not is_recoverable(reason):
        return ActionType.MANUAL_REVIEW
    if reason in (FailureReason.PROCESS_TIMEOUT, FailureReason.KAFKA_FAILURE):
        return ActionType.AUTO_RETRY
    return ActionType.DELAYED_RETRY


def make_dead_letter(
    *,
    reason: FailureReason,
    failure_time: float,
    settings: DLQSettings,
    envelope: Envelope | dict[str, Any] | None = None,
    raw_value: bytes | None = None,
    message_id: str | None = None,
    details: str = "",
    source: KafkaSource | None = None,
    retry_count: int = 0,
    user_id: str | None = None,
    user_group: str = "normal",
    processor_id: str = "",
    node_id: str = "",
    session_id: str = "",
) -> DeadLetterMessage:
    """Build a letter with the retry policy applied. Poison records pass `raw_value`."""
    original: dict[str, Any] | None
    original = envelope.model_dump() if isinstance(envelope, Envelope) else envelope
    mid = message_id or (str(original.get("message_id", "")) if original else "")
    if not mid:
        src = source or KafkaSource()
        mid = f"raw:{src.topic}:{src.partition}:{src.offset}"
    uid = user_id if user_id is not None else str((original or {}).get("external_userid", ""))
    src = source or KafkaSource()
    recoverable = is_recoverable(reason)
    return DeadLetterMessage(
        original_message=original,
        original_raw_b64=(
            base64.b64encode(raw_value).decode() if original is None and raw_value else None
        ),
        message_id=mid,
        failure_reason=reason,
        failure_details=details[:4000],
        failure_time=failure_time,
        processor_id=processor_id,
        node_id=node_id,
        retry_count=retry_count,
        source_topic=src.topic,
        source_partition=src.partition,
        source_offset=src.offset,
        source_timestamp=src.timestamp,
        user_id=uid,
        user_group=user_group,
        open_kfid=str((original or {}).get("open_kfid", "")),
        session_id=session_id,
        recoverable=recoverable,
        priority=calculate_priority(reason, user_group),
        max_retries=max_retries_for(reason, settings),
        ttl_s=settings.ttl_s,
        suggested_action=suggest_action(reason),
        manual_review=not recoverable,
    )

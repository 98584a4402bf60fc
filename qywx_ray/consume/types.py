"""Shared value types and the small seams (Protocols) of the consume path.

`Delivery` is what a partition consumer hands to a host: only routing data plus the raw
record; hosts parse it. The Protocols are the hooks other packages plug into (protection,
dead letters, done-flags, completions); each has a trivial default so consume runs alone.
Nothing here talks to Kafka, Redis or Ray.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Protocol

# Reasons a message ends in the dead-letter topic instead of being processed.
REASON_INVALID = "invalid_message"
REASON_DOWNSTREAM = "downstream_error"
REASON_TIMEOUT = "process_timeout"
REASON_RATE_LIMITED = "rate_limited"
REASON_BLOCKED = "user_blocked"
REASON_CIRCUIT_OPEN = "circuit_open"
REASON_QUEUE_FULL = "queue_full"
RETRYABLE_REASONS = frozenset(
    {REASON_DOWNSTREAM, REASON_TIMEOUT, REASON_RATE_LIMITED, REASON_CIRCUIT_OPEN, REASON_QUEUE_FULL}
)


class Delivery(NamedTuple):
    """One Kafka record on its way to a user mailbox."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # Kafka record timestamp (append/create time)
    key: str  # external_userid
    value: bytes
    msg_id: str  # from the msg_id header; "" if absent (then parsed from the value)
    consumer: str  # name of the consumer actor to report completion to

    @property
    def tpo(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


@dataclass
class DeadLetter:
    """A message that could not be processed, with everything needed to retry it."""

    reason: str
    error: str
    message_id: str
    user: str
    open_kfid: str
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    attempt: int = 1
    retryable: bool = field(default=False)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["value_b64"] = base64.b64encode(self.value).decode()
        del data["value"]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeadLetter:
        data = json.loads(raw)
        data["value"] = base64.b64decode(data.pop("value_b64"))
        return cls(**data)


class Admission(Protocol):
    """Protection hook: decides per message whether it may enter its user's mailbox."""

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        """For each (user, n): n decisions in order, None = admitted, else a denial reason."""
        ...

    def on_success(self, user: str) -> None: ...

    def on_failure(self, user: str) -> None: ...


class DeadLetterSink(Protocol):
    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        """Resolve only when every letter is durable; raise if they are not."""
        ...


class CompletionSink(Protocol):
    def complete(self, consumer: str, done: Sequence[tuple[str, int, int]]) -> None:
        """Non-blocking: report (topic, partition, offset) finished to `consumer`."""
        ...


class AllowAll:
    """Default Admission: every message admitted, no breaker."""

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        return {user: [None] * n for user, n in requests}

    def on_success(self, user: str) -> None:
        return None

    def on_failure(self, user: str) -> None:
        return None

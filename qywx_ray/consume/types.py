"""Shared value types and the small seams (Protocols) of the consume path.

`Delivery` is what a partition consumer hands to a host: only routing data plus the raw
record; hosts parse it. The Protocols are the hooks other packages plug into (protection,
dead letters, done-flags, completions); each has a trivial default so consume runs alone.
Nothing here talks to Kafka, Redis or Ray.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple, Protocol

from qywx_ray.reasons import RETRYABLE_REASONS as RETRYABLE_REASONS
from qywx_ray.reasons import FailureReason

# Thin aliases of `FailureReason` kept for the consume internals that import them; plain
# `str` values so nothing the consume path sends (Ray calls, DLQ records) changes type.
REASON_INVALID: str = FailureReason.INVALID_MESSAGE.value
REASON_DOWNSTREAM: str = FailureReason.DOWNSTREAM_ERROR.value
REASON_TIMEOUT: str = FailureReason.PROCESS_TIMEOUT.value
REASON_RATE_LIMITED: str = FailureReason.RATE_LIMITED.value
REASON_BLOCKED: str = FailureReason.USER_BLOCKED.value
REASON_CIRCUIT_OPEN: str = FailureReason.CIRCUIT_OPEN.value
REASON_QUEUE_FULL: str = FailureReason.QUEUE_FULL.value


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
    retry_count: int = 0  # header retry_count of a record re-produced by the DLQ recovery
    is_retry: bool = False  # header retry_from_dlq: already counted by protection once
    is_drain: bool = False  # header qywx_drain: a drain token, never runs the handler

    @property
    def tpo(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


# Wire forms of the two hot Ray calls. Columns of plain lists/str/int/bytes/bool travel
# through Ray's msgpack path in C; a list of NamedTuples goes through cloudpickle, one
# Python reducer call per message (measured here: ~11 µs vs ~0.3 µs a message).
PackedDeliveries = list[list[Any]]
PackedDone = list[list[Any]]  # [[topic, partition, [offset, ...]], ...]


def pack_deliveries(batch: Sequence[Delivery]) -> PackedDeliveries:
    """Columns (one list per Delivery field); `unpack_deliveries` restores the batch."""
    return [list(column) for column in zip(*batch, strict=True)] if batch else []


def unpack_deliveries(packed: PackedDeliveries) -> list[Delivery]:
    return list(map(Delivery._make, zip(*packed, strict=True))) if packed else []


def pack_done(done: Iterable[tuple[str, int, int]]) -> PackedDone:
    """Completed (topic, partition, offset)s grouped per partition, order kept within each."""
    groups: dict[tuple[str, int], list[int]] = {}
    for topic, partition, offset in done:
        offsets = groups.get((topic, partition))
        if offsets is None:
            offsets = groups[(topic, partition)] = []
        offsets.append(offset)
    return [[topic, partition, offsets] for (topic, partition), offsets in groups.items()]


def unpack_done(packed: PackedDone) -> Iterator[tuple[str, int, int]]:
    for topic, partition, offsets in packed:
        for offset in offsets:
            yield (topic, partition, offset)


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


class Admission(Protocol):
    """Protection hook: decides per message whether it may enter its user's mailbox."""

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        """For each (user, n): n decisions in order, None = admitted, else a denial reason."""
        ...

    def on_success(self, user: str) -> None: ...

    def on_failure(self, user: str) -> None: ...


class TimedAdmission(Protocol):
    """Optional richer Admission: each message rated at its own send time (Unix s), so a
    backlog replayed after an outage is not mistaken for a flood. Raises when its store
    is unreachable; the host then follows `consume.redis_down_policy`."""

    async def admit_at(
        self, requests: Sequence[tuple[str, Sequence[float]]]
    ) -> dict[str, list[str | None]]: ...


# Codes of RetryOrder.admit, per message.
PARKED = 0  # durably appended behind the user's message in the retry path: complete it
ADMITTED = 1  # process now
WAITED_ON = 2  # the very message the user is parked behind: process, then drain the lot
# Result of RetryOrder.park: applied, or left alone because an older blocker holds the user.
PARK_APPLIED = 1
PARK_FOREIGN = 2


@dataclass(frozen=True)
class ParkRequest:
    """One `RetryOrder.park` call: park `user` behind `message_id`.

    One value rather than six parameters, so the Protocol, the Redis lot and the test
    doubles name the call's parts once, and a retry after an unknown outcome resends the
    very same request (same `op_id`)."""

    user: str
    message_id: str  # the blocker the user's later messages wait on
    drop_first: int  # parked items to drop first: a drained chunk the host holds
    pending: Sequence[bytes]  # envelopes put in front of the lot, in order
    op_id: str = ""  # idempotency key: applied at most once per op id
    replaces: Sequence[str] = ()  # blockers this park may take the flag over from


@dataclass(frozen=True)
class HoldRequest:
    """One `RetryOrder.hold` call: a full mailbox's overflow, held behind its newest
    queued message (a value for the reason given at `ParkRequest`)."""

    user: str
    message_id: str  # the host's newest queued message, which drains the lot when done
    values: Sequence[bytes]  # the overflow's envelopes, in order
    op_id: str = ""  # idempotency key: applied at most once per op id
    position: tuple[int, int] = (-1, -1)  # (partition, offset) of `message_id`


class RetryOrder(Protocol):
    """Per-user order across DLQ retries (the dlq package's parking lot, async, batched).

    A user is parked behind one message id while that message is in the retry path; the
    user's later messages wait, durably and in order, until it succeeded.
    """

    def parks(self, reason: str) -> bool:
        """Whether a failure for this reason parks the user's later messages."""
        ...

    async def admit(self, items: Sequence[tuple[str, str, bytes, bool, int, int]]) -> list[int]:
        """(user, message_id, value, is_retry, partition, offset) -> PARKED / ADMITTED /
        WAITED_ON; one trip. A record older (same partition, lower offset) than the
        position of a hold's blocker is ADMITTED, never parked behind a newer message."""
        ...

    async def park(self, request: ParkRequest) -> int:
        """Atomically: drop the first `drop_first` parked items (a drained chunk the host
        holds), put `pending` in front, and wait on `message_id` (PARK_APPLIED). Applied
        at most once per `op_id` (a resend returns the first answer): the caller reuses
        it when it retries after an unknown outcome. If the user already waits on a
        message other than `message_id` and not in `replaces`, that older blocker stays
        and nothing changes (PARK_FOREIGN)."""
        ...

    async def advance(
        self, user: str, message_id: str, drop_n: int, max_n: int, op_id: str = ""
    ) -> tuple[int, list[bytes]]:
        """While the user waits on `message_id`: drop `drop_n` processed items (once per
        `op_id`), return up to `max_n` next ones (status 1), or unpark when empty
        (status 2); 0 = not waiting."""
        ...

    async def hold(self, request: HoldRequest) -> None:
        """Append `values` to the user's lot (once per `op_id`) and, unless the user already
        waits on a message, make it wait on `message_id`: the host's newest queued message,
        which drains the lot when it finishes (a full mailbox overflows into the lot).
        `position` = that message's (partition, offset): see `admit`."""
        ...


DRAIN_HEADER = "qywx_drain"


class DrainTokenSink(Protocol):
    """Puts a *drain token* for a parked user on the main topic (key = user), resolving
    only once Kafka acknowledged it.

    A token is a tiny record (headers `msg_id` = the blocker, `retry_from_dlq`, and
    `qywx_drain`) that the host handles like the blocker's retry without running the
    handler: "the user is released from `message_id`; drain its lot". Two writers: a host
    that is draining (it hands its hold on the partition's commit from one token to the
    next, one chunk at a time, so a long drain never pins a commit) and the DLQ recovery
    (a blocker sent to manual review releases its user). A crash mid-drain leaves the
    newest token uncommitted: it comes back and the drain resumes.
    """

    async def drain_token(self, user: str, message_id: str, open_kfid: str) -> None: ...


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

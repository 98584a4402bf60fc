"""The one vocabulary of why a message did not simply succeed: a denial or a failure.

Protection's denials, the consume path's failures and the dead-letter record all speak
these values. They are wire values: they travel in DLQ records on Kafka, in Redis index
keys (`p:by_reason:{reason}`) and as the `reason` label of metrics, so a value must never
change once released; add a new member instead.
"""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    """Why a message was denied or failed; the value is what is stored and counted."""

    # Denials (protection decides; the consumer dead-letters the message with this reason).
    RATE_LIMITED = "rate_limited"
    USER_BLOCKED = "user_blocked"
    CIRCUIT_OPEN = "circuit_open"
    QUEUE_FULL = "queue_full"
    # Failures while processing.
    PROCESS_TIMEOUT = "process_timeout"
    KAFKA_FAILURE = "kafka_failure"
    INVALID_MESSAGE = "invalid_message"
    DOWNSTREAM_ERROR = "downstream_error"
    SYSTEM_OVERLOAD = "system_overload"
    # The handler succeeded but its new per-user state is over consume.state_max_bytes:
    # a retry would compute the same state again, so it goes to manual review.
    STATE_TOO_LARGE = "state_too_large"

    @classmethod
    def parse(cls, value: str) -> FailureReason:
        """The member for a stored value; an unknown value (a record written by a newer
        release, or by hand) counts as `DOWNSTREAM_ERROR`, the generic retryable failure,
        so reading it never fails."""
        try:
            return cls(value)
        except ValueError:
            return cls.DOWNSTREAM_ERROR


# What protection can answer with: the reasons of a denial rather than a failure.
DENY_REASONS = frozenset(
    {
        FailureReason.RATE_LIMITED,
        FailureReason.USER_BLOCKED,
        FailureReason.CIRCUIT_OPEN,
        FailureReason.QUEUE_FULL,
    }
)

# Failures the consume path marks retryable in the dead letter: the same message may
# succeed later (the downstream recovers, the limit window passes, the queue drains).
RETRYABLE_REASONS = frozenset(
    {
        FailureReason.DOWNSTREAM_ERROR,
        FailureReason.PROCESS_TIMEOUT,
        FailureReason.RATE_LIMITED,
        FailureReason.CIRCUIT_OPEN,
        FailureReason.QUEUE_FULL,
    }
)

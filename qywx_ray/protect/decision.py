"""What protection decided about one message, and why (the reasons are shared with the DLQ).

Protection only decides: a denied message is never dropped here. The consumer sends it
to the DLQ with a `FailureReason` (one of `DENY_REASONS`) as its reason; the reasons
live in qywx_ray/reasons.py, shared with the consume path and the DLQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from qywx_ray.obs import metrics
from qywx_ray.reasons import FailureReason


class Verdict(StrEnum):
    ALLOW = "allow"
    RATE_LIMITED = "rate_limited"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class Decision:
    """The rate limiter's answer for one message; `blocked_until` is Unix seconds
    (None when not blocked, `math.inf` for a permanent block)."""

    verdict: Verdict
    reason: str = ""
    blocked_until: float | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def deny_reason(self) -> FailureReason | None:
        if self.verdict is Verdict.RATE_LIMITED:
            return FailureReason.RATE_LIMITED
        if self.verdict is Verdict.BLOCKED:
            return FailureReason.USER_BLOCKED
        return None


ALLOW = Decision(Verdict.ALLOW)

MESSAGES_DENIED = metrics.counter(
    "qywx_messages_denied_total", "Messages denied by protection, by reason", ("reason",)
)


def record_denied(reason: FailureReason, count: int = 1) -> None:
    """Count denied messages (the limiter and breaker call this; callers need not)."""
    if count > 0:
        MESSAGES_DENIED.inc(count, reason=reason.value)

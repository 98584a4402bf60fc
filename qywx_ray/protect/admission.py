"""The consume path's Admission hook over the Redis rate limiter (one EVALSHA per batch).

`make_admission(settings)` is what `consume.admission` names. Each message is rated at
its own WeCom send time (`admit_at` → RateLimiter.check_batch_at), so a backlog replayed
after an outage is not seen as a flood; the host never passes messages that came back
from the DLQ (they were counted once already). Translates decisions to the DLQ reasons
(rate_limited / user_blocked). Never swallows a Redis failure: it raises InfraError and
the host applies `consume.redis_down_policy` (stop: retry, do not complete; process:
admit and count). Counting of denials is the limiter's (never counted again here).
The per-user breaker lives in the host's mailbox (protect.breaker.CircuitBreaker).
"""

from __future__ import annotations

from collections.abc import Sequence

from qywx_ray.consume.types import Admission, AllowAll
from qywx_ray.protect.decision import Decision
from qywx_ray.protect.groups import UserGroups
from qywx_ray.protect.ratelimit import RateLimiter
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis


def _reasons(decisions: dict[str, list[Decision]]) -> dict[str, list[str | None]]:
    return {
        user: [None if d.allowed else str(d.deny_reason or "rate_limited") for d in ds]
        for user, ds in decisions.items()
    }


class RateLimitAdmission:
    """Admission + TimedAdmission over a RateLimiter."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        """Rated at the limiter's clock (Redis TIME)."""
        return _reasons(await self.limiter.check_batch(requests))

    async def admit_at(
        self, requests: Sequence[tuple[str, Sequence[float]]]
    ) -> dict[str, list[str | None]]:
        """Each message rated at its own time (Unix seconds)."""
        return _reasons(await self.limiter.check_batch_at(requests))

    def on_success(self, user: str) -> None:
        return None

    def on_failure(self, user: str) -> None:
        return None


def make_admission(settings: Settings) -> Admission:
    """Hook factory: the rate limiter on the configured Redis; allow-all when disabled."""
    if not settings.protect.enabled:
        return AllowAll()
    redis = make_async_redis(settings.redis)
    limiter = RateLimiter(redis, settings.protect, UserGroups(settings.protect, redis))
    return RateLimitAdmission(limiter)

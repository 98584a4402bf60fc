"""Protection settings: the seed's rate-limit groups, progressive penalty and breaker."""

from __future__ import annotations

from pydantic import BaseModel


class RateLimitRule(BaseModel):
    window_seconds: float
    max_messages: int
    penalty_threshold: int
    block_hours: float


def _seed_groups() -> dict[str, RateLimitRule]:
    return {
        "normal": RateLimitRule(
            window_seconds=10, max_messages=5, penalty_threshold=3, block_hours=1.0
        ),
        "vip": RateLimitRule(
            window_seconds=10, max_messages=20, penalty_threshold=10, block_hours=0.5
        ),
        "suspicious": RateLimitRule(
            window_seconds=30, max_messages=3, penalty_threshold=1, block_hours=24.0
        ),
        "whitelist": RateLimitRule(
            window_seconds=1, max_messages=9999, penalty_threshold=9999, block_hours=0.0
        ),
    }


class ProgressivePenaltySettings(BaseModel):
    enabled: bool = False
    multiplier: float = 2.0
    max_block_hours: float = 24.0
    history_hours: float = 24.0


class BreakerSettings(BaseModel):
    failure_threshold: int = 100
    open_seconds: float = 30.0
    success_threshold: int = 10


class ProtectSettings(BaseModel):
    enabled: bool = True
    default: RateLimitRule = RateLimitRule(
        window_seconds=10, max_messages=5, penalty_threshold=3, block_hours=1.0
    )
    groups: dict[str, RateLimitRule] = _seed_groups()
    user_groups: dict[str, str] = {}
    progressive_penalty: ProgressivePenaltySettings = ProgressivePenaltySettings()
    breaker: BreakerSettings = BreakerSettings()

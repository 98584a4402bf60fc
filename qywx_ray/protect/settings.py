"""Protection settings: the original design's rate-limit groups, progressive penalty and breaker.

Group names are data: `default` is the rule for users in no group; `user_groups` maps a
user (external_userid) to one of `groups`; the admin API can override a user's group
and rule at run time (kept in Redis, see protect/ratelimit.py).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, model_validator

WHITELIST = "whitelist"
DEFAULT_GROUP = "default"
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")


class RateLimitRule(BaseModel):
    """At most `max_messages` in any `window_seconds` (closed window); the
    `penalty_threshold`-th consecutive violation blocks the user for `block_hours`."""

    window_seconds: float = Field(gt=0, le=86400)
    max_messages: int = Field(ge=1)
    penalty_threshold: int = Field(ge=1)
    block_hours: float = Field(ge=0)


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
        WHITELIST: RateLimitRule(
            window_seconds=1, max_messages=9999, penalty_threshold=9999, block_hours=0.0
        ),
    }


class ProgressivePenaltySettings(BaseModel):
    """Block k+1 within `history_hours` lasts base × multiplier**k, capped at max_block_hours."""

    enabled: bool = False
    multiplier: float = Field(default=2.0, ge=1.0)
    max_block_hours: float = Field(default=24.0, gt=0)
    history_hours: float = Field(default=24.0, gt=0)


class BreakerSettings(BaseModel):
    failure_threshold: int = Field(default=100, ge=1)
    open_seconds: float = Field(default=30.0, gt=0)
    success_threshold: int = Field(default=10, ge=1)


class ProtectSettings(BaseModel):
    enabled: bool = True
    default: RateLimitRule = RateLimitRule(
        window_seconds=10, max_messages=5, penalty_threshold=3, block_hours=1.0
    )
    groups: dict[str, RateLimitRule] = _seed_groups()
    user_groups: dict[str, str] = {}
    progressive_penalty: ProgressivePenaltySettings = ProgressivePenaltySettings()
    breaker: BreakerSettings = BreakerSettings()
    # EMERGENCY alert: this many users blocked at the same time.
    emergency_blocked_users: int = Field(default=10, ge=1)
    # Admin: the longest temporary rule override, and how many audit entries are kept.
    max_override_seconds: float = Field(default=30 * 86400, gt=0)
    audit_max_entries: int = Field(default=10000, ge=1)

    @model_validator(mode="after")
    def _known_groups(self) -> ProtectSettings:
        known = set(self.groups) | {DEFAULT_GROUP}
        unknown = sorted({g for g in self.user_groups.values() if g not in known})
        if unknown:
            raise ValueError(
                f"protect.user_groups names unknown group(s) {unknown}; "
                f"define them under protect.groups (known: {sorted(known)})"
            )
        bad = sorted(g for g in self.groups if not _GROUP_NAME.fullmatch(g))
        if bad:
            raise ValueError(f"protect.groups: names must match [A-Za-z0-9_-]{{1,32}}: {bad}")
        if DEFAULT_GROUP in self.groups:
            raise ValueError("protect.groups must not define 'default'; use protect.default")
        return self

    def rule_for(self, group: str) -> RateLimitRule:
        """The rule of a group; unknown groups fall back to `default`."""
        return self.groups.get(group, self.default)

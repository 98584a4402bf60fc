"""Protection settings, groups and the deny reasons shared with the DLQ."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qywx_ray.protect.decision import ALLOW, Decision, Verdict
from qywx_ray.protect.groups import GroupResolver, UserGroups
from qywx_ray.protect.settings import ProtectSettings
from qywx_ray.reasons import DENY_REASONS, FailureReason


def test_deny_reason_values_are_the_dlq_contract() -> None:
    assert sorted(r.value for r in DENY_REASONS) == [
        "circuit_open",
        "queue_full",
        "rate_limited",
        "user_blocked",
    ]
    assert ALLOW.allowed
    assert ALLOW.deny_reason is None
    assert Decision(Verdict.RATE_LIMITED).deny_reason is FailureReason.RATE_LIMITED
    assert Decision(Verdict.BLOCKED).deny_reason is FailureReason.USER_BLOCKED


def test_seed_group_numbers() -> None:
    s = ProtectSettings()
    got = {
        name: (r.window_seconds, r.max_messages, r.penalty_threshold, r.block_hours)
        for name, r in {"default": s.default, **s.groups}.items()
    }
    assert got == {
        "default": (10, 5, 3, 1.0),
        "normal": (10, 5, 3, 1.0),
        "vip": (10, 20, 10, 0.5),
        "suspicious": (30, 3, 1, 24.0),
        "whitelist": (1, 9999, 9999, 0.0),
    }
    pp = s.progressive_penalty
    assert (pp.enabled, pp.multiplier, pp.max_block_hours, pp.history_hours) == (
        False,
        2.0,
        24.0,
        24.0,
    )


def test_unknown_group_in_user_groups_is_a_clear_error() -> None:
    with pytest.raises(ValidationError, match="unknown group"):
        ProtectSettings(user_groups={"u": "gold"})
    rule = {"window_seconds": 1, "max_messages": 1, "penalty_threshold": 1, "block_hours": 0}
    with pytest.raises(ValidationError, match="names must match"):
        ProtectSettings(groups={"a|b": rule})  # type: ignore[dict-item]  # pydantic validates the dict
    with pytest.raises(ValidationError, match=r"protect\.default"):
        ProtectSettings(groups={"default": rule})  # type: ignore[dict-item]  # pydantic validates the dict


async def test_config_resolver_and_protocol() -> None:
    groups = UserGroups(ProtectSettings(user_groups={"a": "vip", "b": "whitelist"}))
    assert isinstance(groups, GroupResolver)
    assert await groups.resolve(["a", "b", "c"]) == {"a": "vip", "b": "whitelist", "c": "default"}

    class Tiered:
        async def resolve(self, users: list[str]) -> dict[str, str]:
            return {u: "vip" for u in users}

    assert isinstance(Tiered(), GroupResolver)

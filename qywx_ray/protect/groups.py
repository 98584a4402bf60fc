"""User groups for rate limiting: default / normal / vip / suspicious / whitelist.

A `GroupResolver` names each user's group for a batch; it is a Protocol so a business
can plug its own (CRM tier, risk score). `UserGroups` is the default: the config map
`protect.user_groups`, else `default`. On top of any resolver, an operator's override
set through the admin API (Redis hash `qywx:rl:groups`) wins; the limiter reads those
overrides inside its one script per batch, so resolving never costs an extra round trip.
Never raises for an unknown user: such a user is in `default`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import redis.asyncio as aioredis

from qywx_ray.protect.settings import DEFAULT_GROUP, WHITELIST, ProtectSettings

GROUP_OVERRIDES_KEY = "qywx:rl:groups"


@runtime_checkable
class GroupResolver(Protocol):
    async def resolve(self, users: Sequence[str]) -> dict[str, str]:
        """The group name of each user (unknown names fall back to the default rule)."""
        ...


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class UserGroups:
    """Config-map resolver plus the operator overrides kept in Redis."""

    def __init__(self, settings: ProtectSettings, redis: aioredis.Redis | None = None) -> None:
        self._settings = settings
        self._redis = redis

    @property
    def names(self) -> list[str]:
        return [DEFAULT_GROUP, *self._settings.groups]

    def configured(self, user: str) -> str:
        return self._settings.user_groups.get(user, DEFAULT_GROUP)

    async def resolve(self, users: Sequence[str]) -> dict[str, str]:
        return {u: self.configured(u) for u in users}

    def is_whitelisted_by_config(self, user: str) -> bool:
        return self.configured(user) == WHITELIST

    # --- operator overrides (admin API) -------------------------------------------------

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("UserGroups was built without Redis; overrides need it")
        return self._redis

    async def override(self, user: str) -> str | None:
        return _s(await self._client().hget(GROUP_OVERRIDES_KEY, user))

    async def set_override(self, user: str, group: str) -> None:
        if group not in self.names:
            raise ValueError(f"unknown group {group!r}; known groups: {self.names}")
        await self._client().hset(GROUP_OVERRIDES_KEY, user, group)

    async def clear_override(self, user: str) -> bool:
        """Remove the operator's group for a user; False when there was none."""
        return bool(await self._client().hdel(GROUP_OVERRIDES_KEY, user))

    async def effective(self, user: str) -> str:
        return await self.override(user) or self.configured(user)

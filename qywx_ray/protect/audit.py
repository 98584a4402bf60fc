"""Audit trail of operator actions: who did what to whom, when and why.

A capped Redis list (`qywx:audit`, newest first) of JSON entries. Written by every admin
action on protection state; read by `GET /admin/audit`. Never stores secrets or message
contents.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

AUDIT_KEY = "qywx:audit"


class AuditEntry(BaseModel):
    ts: float  # Unix seconds
    actor: str
    action: str
    user: str = ""
    reason: str = ""
    details: dict[str, Any] = {}


class AuditLog:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_entries: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._max_entries = max_entries
        self._clock = clock

    async def record(
        self,
        actor: str,
        action: str,
        *,
        user: str = "",
        reason: str = "",
        details: dict[str, Any] | None = None,
    ) -> AuditEntry:
        entry = AuditEntry(
            ts=self._clock(),
            actor=actor,
            action=action,
            user=user,
            reason=reason,
            details=details or {},
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(AUDIT_KEY, entry.model_dump_json())
            pipe.ltrim(AUDIT_KEY, 0, self._max_entries - 1)
            await pipe.execute()
        return entry

    async def entries(self, limit: int = 100, user: str | None = None) -> list[AuditEntry]:
        """Newest first; `user` filters (scanning at most the retained entries)."""
        stop = (limit - 1) if user is None else (self._max_entries - 1)
        raw = await self._redis.lrange(AUDIT_KEY, 0, stop)
        out: list[AuditEntry] = []
        for item in raw:
            entry = AuditEntry.model_validate(json.loads(item))
            if user is None or entry.user == user:
                out.append(entry)
                if len(out) >= limit:
                    break
        return out

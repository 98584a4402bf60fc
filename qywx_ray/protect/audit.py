"""Audit trail of operator actions: who did what to whom, when and why.

A capped Redis list (`qywx:audit`, newest first) of JSON entries. Written by every admin
action on protection state; read by `GET /admin/audit`. Never stores secrets or message
contents, nor control characters: every text is passed through clean_text, so a reason or
user id cannot forge lines, colours or right-to-left text in whatever displays the log.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

AUDIT_KEY = "qywx:audit"

# Bidirectional overrides/isolates: invisible, and they reorder what a reader sees.
_BIDI = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def clean_text(text: str) -> str:
    """`text` without control characters (C0/C1, incl. CR, LF, TAB, ESC, NUL), line or
    paragraph separators and bidi controls; everything else is kept as written."""
    return "".join(
        c for c in text if c not in _BIDI and unicodedata.category(c) not in ("Cc", "Zl", "Zp")
    )


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


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
            actor=clean_text(actor),
            action=clean_text(action),
            user=clean_text(user),
            reason=clean_text(reason),
            details=_clean(details or {}),
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

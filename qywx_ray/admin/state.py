"""Admin API for per-user state (consume/state.py): read it, or reset it for a support case.

Both routes need the admin bearer token and both are written to the audit log (who, when,
which user) before the response is sent: reading a customer's state is itself worth a
trace. DELETE never removes the version: it clears the data and bumps the version in one
Lua step (an old-layout hash is rewritten in the string layout, consume/state.py), so a
host that has the user active and a commit in flight is refused (its version is stale),
restarts and reloads the empty state; a lost update is impossible.
No `from __future__ import annotations`: FastAPI must see the local `Actor` type.
"""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel, SecretStr

from qywx_ray.admin.auth import require_admin
from qywx_ray.admin.settings import AdminSettings
from qywx_ray.consume.state import LOAD_LUA, STATE_KEY, parse_loaded
from qywx_ray.protect.audit import AuditLog

# external_userid as WeCom issues it (and our test ids): no spaces, slashes or wildcards.
UserId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:-]+$")]

_RESET_LUA = """
local v, data
local s = redis.pcall('GET', KEYS[1])
if type(s) == 'table' then  -- an old-layout hash
  local got = redis.call('HMGET', KEYS[1], 'v', 'data')
  v, data = tonumber(got[1] or '0'), got[2]
elseif s then
  v, data = tonumber(string.sub(s, 1, 20)), string.sub(s, 21)
end
if not data or data == '' then return -1 end
v = v + 1
redis.call('SET', KEYS[1], string.format('%020d', v), 'EX', ARGV[1])
return v
"""


class UserState(BaseModel):
    user: str
    version: int
    state: Any  # the decoded JSON (a mapping, or a model's fields)
    size_bytes: int
    ttl_s: int  # seconds until the key expires (-1: no expiry)


class StateReset(BaseModel):
    user: str
    version: int  # the version after the reset


def make_state_router(
    redis: Any, audit: AuditLog, token: AdminSettings | SecretStr, state_ttl_s: int
) -> APIRouter:
    Actor = Annotated[str, Depends(require_admin(token))]
    router = APIRouter(tags=["users"])

    @router.get("/admin/users/{user}/state", response_model=UserState)
    async def get_state(user: UserId, actor: Actor) -> UserState:
        """The user's committed state (what a handler would load now)."""
        key = STATE_KEY.format(user)
        async with redis.pipeline(transaction=False) as pipe:
            pipe.eval(LOAD_LUA, 1, key)
            pipe.ttl(key)
            got, ttl = await pipe.execute()
        slot = parse_loaded([user], got)[user]
        await audit.record(actor, "state_read", user=user)
        if not slot.raw:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user!r} has no state")
        raw, version = slot.raw, slot.version
        try:
            decoded = json.loads(raw)
        except ValueError:  # written by something else than the runtime: show it raw
            decoded = raw.decode(errors="replace")
        return UserState(user=user, version=version, state=decoded, size_bytes=len(raw), ttl_s=ttl)

    @router.delete("/admin/users/{user}/state", response_model=StateReset)
    async def delete_state(
        user: UserId, actor: Actor, reason: Annotated[str, Query(max_length=500)] = ""
    ) -> StateReset:
        """Reset the user's state (the next message starts from an empty one)."""
        version = int(await redis.eval(_RESET_LUA, 1, STATE_KEY.format(user), state_ttl_s))
        if version < 0:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user!r} has no state")
        await audit.record(
            actor, "state_delete", user=user, reason=reason, details={"version": version}
        )
        return StateReset(user=user, version=version)

    return router

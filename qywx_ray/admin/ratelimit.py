"""Admin API for rate limiting and blocks ("运维管理接口"), plus the audit log.

Every route needs the admin bearer token (require_admin); every change is written to the
audit log (who, when, what, why) before the response is sent. Routes only call the
limiter's and groups' admin helpers; they never touch Redis keys themselves. "Known
user": one with any rate-limit state, override, operator group or configured group.
No `from __future__ import annotations` here: FastAPI must see the router factory's local
`Actor` dependency type at definition time.
"""

import math
from typing import Annotated, Self

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, BeforeValidator, Field, SecretStr, model_validator

from qywx_ray.admin.auth import require_admin
from qywx_ray.admin.settings import AdminSettings
from qywx_ray.protect.audit import AuditEntry, clean_text
from qywx_ray.protect.groups import UserGroups
from qywx_ray.protect.ratelimit import BlockedUser, RateLimiter, UserStatus
from qywx_ray.protect.settings import WHITELIST, RateLimitRule

UserPath = Annotated[str, Field(min_length=1, max_length=128)]
# Reasons are stored (block reason, audit log) and shown to operators: no control characters.
# Cleaned before the length checks, so a reason of only control characters is empty (422).
Reason = Annotated[str, BeforeValidator(lambda v: clean_text(v) if isinstance(v, str) else v)]

# Bounds on every number an operator sends: each one ends up in Redis and in the Lua
# limiter as integer milliseconds or counts, so NaN, Infinity, 0-ms windows and values
# beyond what the limiter can format as an integer are refused with 422, never stored.
MAX_COUNT = 1_000_000  # messages per window / violations before a block ("never" = this)
MAX_BLOCK_SECONDS = 366 * 86400  # a longer temporary block is a permanent one
MAX_UNIX_S = 10_000_000_000.0  # year 2286: an expires_at beyond it is a typo


class ReasonBody(BaseModel):
    reason: Reason = Field(min_length=1, max_length=500, description="Why (kept in the audit log)")


class OptionalReasonBody(BaseModel):
    reason: Reason = Field(default="", max_length=500)


class BlockBody(BaseModel):
    reason: Reason = Field(min_length=1, max_length=500)
    permanent: bool = True
    duration_seconds: float | None = Field(
        default=None,
        gt=0,
        le=MAX_BLOCK_SECONDS,
        allow_inf_nan=False,
        description="Required when permanent is false (at most a year: longer is permanent)",
    )

    @model_validator(mode="after")
    def _duration(self) -> Self:
        if not self.permanent and self.duration_seconds is None:
            raise ValueError("a temporary block (permanent=false) needs duration_seconds > 0")
        if self.permanent and self.duration_seconds is not None:
            raise ValueError("give duration_seconds only with permanent=false")
        return self


class LimitBody(BaseModel):
    """A temporary rule for one user; give exactly one of duration_seconds / expires_at."""

    window_seconds: float = Field(ge=0.001, le=86400, allow_inf_nan=False)
    max_messages: int = Field(ge=1, le=MAX_COUNT)
    penalty_threshold: int = Field(ge=1, le=MAX_COUNT, description="Large: never block")
    block_hours: float = Field(ge=0, le=8760, allow_inf_nan=False)
    duration_seconds: float | None = Field(
        default=None, gt=0, le=MAX_BLOCK_SECONDS, allow_inf_nan=False, description="From now"
    )
    expires_at: float | None = Field(
        default=None, gt=0, le=MAX_UNIX_S, allow_inf_nan=False, description="Unix seconds"
    )
    reason: Reason = Field(default="", max_length=500)

    @model_validator(mode="after")
    def _one_expiry(self) -> Self:
        if (self.duration_seconds is None) == (self.expires_at is None):
            raise ValueError("give exactly one of duration_seconds (> 0) or expires_at (Unix s)")
        return self

    def rule(self) -> RateLimitRule:
        return RateLimitRule(
            window_seconds=self.window_seconds,
            max_messages=self.max_messages,
            penalty_threshold=self.penalty_threshold,
            block_hours=self.block_hours,
        )


class GroupBody(BaseModel):
    group: str = Field(min_length=1, max_length=128)
    reason: Reason = Field(default="", max_length=500)


class UnblockResult(BaseModel):
    user: str
    was_blocked: bool


class GroupResult(BaseModel):
    user: str
    group: str | None  # the operator's group now (None: back to configuration)
    changed: bool


class LimitResult(BaseModel):
    user: str
    rule: RateLimitRule
    expires_at: float


def make_ratelimit_router(  # noqa: C901 - a route factory: its nested routes' branches count here
    limiter: RateLimiter, groups: UserGroups, token: AdminSettings | SecretStr
) -> APIRouter:
    Actor = Annotated[str, Depends(require_admin(token))]
    router = APIRouter(tags=["ratelimit"])

    async def known_status(user: str) -> UserStatus:
        st = await limiter.status(user)
        if not st.known:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"user {user!r} has no rate-limit state, override or group",
            )
        return st

    @router.get("/admin/ratelimit/status/{user}", response_model=UserStatus)
    async def get_status(user: UserPath, actor: Actor) -> UserStatus:
        return await known_status(user)

    @router.post("/admin/ratelimit/unblock/{user}", response_model=UnblockResult)
    async def unblock(user: UserPath, body: ReasonBody, actor: Actor) -> UnblockResult:
        await known_status(user)
        was = await limiter.unblock(user, body.reason, actor)
        return UnblockResult(user=user, was_blocked=was)

    @router.post("/admin/ratelimit/block/{user}", response_model=BlockedUser)
    async def block(user: UserPath, body: BlockBody, actor: Actor) -> BlockedUser:
        return await limiter.block(
            user,
            body.reason,
            actor,
            permanent=body.permanent,
            duration_s=body.duration_seconds,
        )

    @router.get("/admin/ratelimit/blocked", response_model=list[BlockedUser])
    async def blocked(
        actor: Actor, limit: Annotated[int, Query(ge=1, le=10000)] = 1000
    ) -> list[BlockedUser]:
        return await limiter.blocked_users(limit)

    async def set_group(user: str, group: str, reason: str, actor: str) -> GroupResult:
        before = await groups.override(user)
        try:
            await groups.set_override(user, group)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
        await limiter.audit.record(
            actor, "set_group", user=user, reason=reason, details={"group": group, "was": before}
        )
        return GroupResult(user=user, group=group, changed=before != group)

    @router.post("/admin/ratelimit/whitelist/{user}", response_model=GroupResult)
    async def whitelist_add(
        user: UserPath, actor: Actor, body: OptionalReasonBody | None = None
    ) -> GroupResult:
        return await set_group(user, WHITELIST, body.reason if body else "", actor)

    @router.delete("/admin/ratelimit/whitelist/{user}", response_model=GroupResult)
    async def whitelist_remove(
        user: UserPath, actor: Actor, reason: Annotated[str, Query(max_length=500)] = ""
    ) -> GroupResult:
        if await groups.override(user) != WHITELIST:
            if groups.configured(user) == WHITELIST:
                raise HTTPException(
                    status.HTTP_409_CONFLICT,
                    f"user {user!r} is whitelisted by configuration (protect.user_groups); "
                    "change the configuration instead",
                )
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user!r} is not whitelisted")
        await groups.clear_override(user)
        await limiter.audit.record(actor, "whitelist_remove", user=user, reason=reason)
        return GroupResult(user=user, group=None, changed=True)

    @router.put("/admin/ratelimit/group/{user}", response_model=GroupResult)
    async def put_group(user: UserPath, body: GroupBody, actor: Actor) -> GroupResult:
        return await set_group(user, body.group, body.reason, actor)

    @router.put("/admin/ratelimit/limit/{user}", response_model=LimitResult)
    async def put_limit(user: UserPath, body: LimitBody, actor: Actor) -> LimitResult:
        now = await limiter.now()
        expires_at = body.expires_at if body.expires_at is not None else now
        if body.duration_seconds is not None:
            expires_at = now + body.duration_seconds
        if not math.isfinite(expires_at):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "expires_at must be finite")
        rule = body.rule()
        try:
            await limiter.set_override(user, rule, expires_at, actor=actor, reason=body.reason)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from exc
        return LimitResult(user=user, rule=rule, expires_at=expires_at)

    @router.delete("/admin/ratelimit/limit/{user}", status_code=status.HTTP_204_NO_CONTENT)
    async def delete_limit(
        user: UserPath, actor: Actor, reason: Annotated[str, Query(max_length=500)] = ""
    ) -> None:
        if not await limiter.clear_override(user, actor=actor, reason=reason):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"user {user!r} has no temporary limit")

    @router.get("/admin/audit", response_model=list[AuditEntry])
    async def audit(
        actor: Actor,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        user: Annotated[str | None, Query(max_length=128)] = None,
    ) -> list[AuditEntry]:
        return await limiter.audit.entries(limit, user=user)

    return router

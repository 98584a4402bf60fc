"""Admin API: live user actors (mode, host, queue depth, last active, state).

Read-only; needs the admin bearer token. The data source is injected (default: ask the
running hosts through Ray), so tests and the Serve app can swap it.
No `from __future__ import annotations`: FastAPI must see the local `Actor` type.
"""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import SecretStr

from qywx_ray.admin.auth import require_admin
from qywx_ray.admin.settings import AdminSettings

UserSource = Callable[[int, str | None], dict[str, Any]]


def ray_user_source(settings: Any) -> UserSource:
    """The default source: snapshots of the live hosts and dedicated actors."""

    def source(limit: int, user: str | None) -> dict[str, Any]:
        from qywx_ray.consume.introspect import list_users

        return list_users(settings, limit=limit, user=user)

    return source


def make_users_router(source: UserSource, token: AdminSettings | SecretStr) -> APIRouter:
    Actor = Annotated[str, Depends(require_admin(token))]
    router = APIRouter(tags=["users"])

    @router.get("/admin/users")
    def list_users(
        _admin: Actor,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        user: Annotated[str | None, Query(max_length=128)] = None,
    ) -> dict[str, Any]:
        """Live users, most recently active first, and a summary per host."""
        return source(limit, user)

    return router

"""The admin API as an app of its own, and the admin routes the ingress mounts.

`create_admin_app` serves `qywx-ray admin serve` on a loopback port; `mount_admin` puts the
same routers on the public ingress app (qywx_ray/ingress/app.py) when `admin.enabled`;
`mount_private_openapi` serves the OpenAPI schema to operators only in production.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from qywx_ray.admin.errors import install_error_handlers
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis


def create_admin_app(settings: Settings, *, users: bool = True) -> FastAPI:
    """The admin API alone, for `qywx-ray admin serve` on a loopback port: the same routers
    and bearer token as on the ingress, without the public callback path. `users=False`
    leaves out GET /admin/users (it needs a connected Ray driver)."""
    redis = make_async_redis(settings.redis)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        with contextlib.suppress(Exception):
            await redis.aclose()

    app = FastAPI(title="qywx-ray admin", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    mount_admin(app, settings, redis, users=users)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    return app


def mount_admin(app: FastAPI, settings: Settings, redis: Any, *, users: bool = True) -> None:
    """The admin routers (rate limits, DLQ, user state, users) on `app`, behind the admin
    bearer token; imported lazily so an ingress without admin routes never loads them."""
    from qywx_ray.admin.dlq import make_dlq_router
    from qywx_ray.admin.ratelimit import make_ratelimit_router
    from qywx_ray.admin.state import make_state_router
    from qywx_ray.admin.users import make_users_router, ray_user_source
    from qywx_ray.protect.audit import AuditLog
    from qywx_ray.protect.groups import UserGroups
    from qywx_ray.protect.ratelimit import RateLimiter

    groups = UserGroups(settings.protect, redis)
    limiter = RateLimiter(redis, settings.protect, groups)
    app.include_router(make_ratelimit_router(limiter, groups, settings.admin))
    app.include_router(make_dlq_router(settings))
    app.include_router(
        make_state_router(redis, AuditLog(redis), settings.admin, settings.consume.state_ttl_s)
    )
    if users:
        app.include_router(make_users_router(ray_user_source(settings), settings.admin))


def mount_private_openapi(app: FastAPI, settings: Settings) -> None:
    """GET /openapi.json for operators only (admin token), e.g. for API clients or fuzzing."""
    from fastapi import Depends

    from qywx_ray.admin.auth import require_admin

    admin = require_admin(settings.admin)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_who: str = Depends(admin)) -> JSONResponse:
        return JSONResponse(app.openapi())

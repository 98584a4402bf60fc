"""Admin routes for dead letters: stats, query, manual/batch retry, TTL purge, streamed export.

Every route requires the admin bearer token. Retries only reschedule through the durable
delay queue; nothing here produces to Kafka or deletes a letter before its TTL.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations,
# which use dependency aliases local to make_dlq_router.

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import StreamingResponse

from qywx_ray.admin.auth import require_admin
from qywx_ray.dlq.manage import DLQFilter, DLQManager, RetryResult
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_redis


def make_dlq_router(  # noqa: C901 - a route factory: its nested routes' branches count here
    settings: Settings,
    *,
    redis_client: redis.Redis | None = None,
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    client = redis_client or make_redis(settings.redis)
    manager = DLQManager(settings, client, clock=clock)
    admin = require_admin(settings.admin)
    router = APIRouter(prefix="/admin/dlq", tags=["dlq"])

    def get_manager() -> DLQManager:
        return manager

    Manager = Annotated[DLQManager, Depends(get_manager)]
    Admin = Annotated[str, Depends(admin)]

    @router.get("/stats")
    def stats(m: Manager, _who: Admin) -> dict[str, Any]:
        return m.stats()

    @router.get("/messages")
    def messages(
        m: Manager,
        _who: Admin,
        user: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
        reason: FailureReason | None = None,
        status: Literal["scheduled", "retried", "manual_review"] | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> dict[str, Any]:
        return m.listing(DLQFilter(user=user, reason=reason, status=status, limit=limit))

    @router.post("/retry/{message_id}")
    def retry(
        m: Manager,
        who: Admin,
        message_id: Annotated[str, Path(min_length=1, max_length=256)],
    ) -> RetryResult:
        result = m.retry(message_id, actor=who)
        if result.result == "not_found":
            raise HTTPException(status_code=404, detail=f"no dead letter with id {message_id!r}")
        if result.result == "undecodable":
            raise HTTPException(
                status_code=409,
                detail=f"{message_id!r} is undecodable (see /admin/dlq/messages); not retried",
            )
        if result.result == "busy":
            raise HTTPException(
                status_code=409, detail=f"{message_id!r} is being re-produced right now; try later"
            )
        return result

    @router.post("/batch-retry")
    def batch_retry(m: Manager, who: Admin, flt: DLQFilter) -> dict[str, int]:
        return {"scheduled": m.batch_retry(flt, actor=who)}

    @router.post("/purge")
    def purge(m: Manager, who: Admin) -> dict[str, int]:
        return {"purged": m.purge_expired(actor=who)}

    @router.get("/export")
    def export(
        m: Manager,
        _who: Admin,
        format: Literal["csv", "jsonl"] = "csv",
        user: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
        reason: FailureReason | None = None,
        status: Literal["scheduled", "retried", "manual_review"] | None = None,
        limit: Annotated[int, Query(ge=1, le=1_000_000)] = 1_000_000,
    ) -> StreamingResponse:
        flt = DLQFilter(user=user, reason=reason, status=status, limit=min(limit, 100_000))
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(
            m.export(flt, format),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="dlq-export.{format}"'},
        )

    return router

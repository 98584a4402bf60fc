"""Schemathesis fuzz of the admin API.

Every admin operation is driven from the app's own OpenAPI schema, in-process (ASGI) over a
real Redis, with valid and invalid (negative) inputs, under the operator's token. Asserts:
no 5xx, every documented response matches its schema, and afterwards every listing GET
still answers 200 (nothing stored by the fuzz made the state unreadable).

The budget is fixed (EXAMPLES per operation, derandomized: the same cases every run), so it
takes a bounded time; a failure prints the falsifying case, which replays exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import hypothesis
import pytest
import redis
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from qywx_ray.admin.dlq import make_dlq_router
from qywx_ray.admin.errors import install_error_handlers
from qywx_ray.admin.ratelimit import make_ratelimit_router
from qywx_ray.admin.users import make_users_router
from qywx_ray.dlq.index import DLQIndex
from qywx_ray.dlq.message import make_dead_letter
from qywx_ray.envelope import Envelope
from qywx_ray.protect.groups import UserGroups
from qywx_ray.protect.ratelimit import RateLimiter
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis

pytestmark = pytest.mark.integration

TOKEN = "fuzz-admin-token-0123456789"
OPERATOR = "fuzzer"
OPERATOR_TOKEN = "fuzz-operator-token-0123456789"
EXAMPLES = 50  # per operation (valid and invalid inputs mixed); ~20 s on 2 busy cores
CHECKS = [not_a_server_error, response_schema_conformance]


def admin_app(settings: Settings, redis_client: redis.Redis) -> FastAPI:
    """The admin routers exactly as qywx_ray/admin/app.py mounts them (users from a fixed source:
    the live-user listing asks Ray, which this test does not start)."""
    aredis = make_async_redis(settings.redis)
    groups = UserGroups(settings.protect, aredis)
    limiter = RateLimiter(aredis, settings.protect, groups)
    app = FastAPI(title="qywx-ray admin")
    install_error_handlers(app)
    app.include_router(make_ratelimit_router(limiter, groups, settings.admin))
    app.include_router(make_dlq_router(settings, redis_client=redis_client))
    app.include_router(
        make_users_router(lambda limit, user: {"users": [], "hosts": {}}, settings.admin)
    )
    return app


def seed_dead_letters(settings: Settings, redis_client: redis.Redis) -> None:
    """A few letters (one with formula-like text) and one undecodable record to list."""
    index = DLQIndex(redis_client, settings.dlq.redis_prefix)
    letters = [
        make_dead_letter(
            reason=FailureReason.DOWNSTREAM_ERROR,
            failure_time=1_800_000_000.0 + i,
            settings=settings.dlq,
            envelope=Envelope(
                message_id=f"fz{i}",
                open_kfid="kf",
                external_userid=f"=user{i}",
                msgtype="text",
                raw={"i": i},
            ),
            details="=1+1\r\n",
        )
        for i in range(3)
    ]
    index.record(letters, [])
    redis_client.hset(index.letters, "fz-bad", b"\xff")


@pytest.fixture
def client(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> Iterator[tuple[TestClient, FastAPI]]:
    settings = make_settings(admin={"token": TOKEN, "operators": {OPERATOR: OPERATOR_TOKEN}})
    seed_dead_letters(settings, redis_client)
    app = admin_app(settings, redis_client)
    # One client (one event loop) for the whole run: the async Redis pool stays on it.
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {OPERATOR_TOKEN}"
        yield c, app


def fuzz_operation(http: TestClient, operation: Any) -> None:
    strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
        GenerationMode.NEGATIVE
    )

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items()}
        headers["Authorization"] = f"Bearer {OPERATOR_TOKEN}"
        body: dict[str, Any] = {}
        for key in ("json", "data", "files"):
            if key in kwargs and kwargs[key] is not None:
                body[key if key != "data" else "content"] = kwargs.pop(key)
        if kwargs.get("cookies"):
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in kwargs["cookies"].items())
        response = http.request(
            kwargs.pop("method"),
            kwargs.pop("url"),
            params=kwargs.pop("params", None),
            headers=headers,
            **body,
        )
        case.validate_response(response, checks=CHECKS)

    run()


def test_admin_api_fuzz_no_5xx_and_state_stays_readable(
    client: tuple[TestClient, FastAPI],
) -> None:
    http, app = client
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]  # third-party stubs
    assert len(operations) >= 15  # every admin route, not a schema that lost them
    for operation in operations:
        fuzz_operation(http, operation)

    # Stored state stays readable: every listing, and the status of every user it names.
    for path, params in [
        ("/admin/ratelimit/blocked", {}),
        ("/admin/audit", {"limit": 1000}),
        ("/admin/dlq/stats", {}),
        ("/admin/dlq/messages", {"limit": 10_000}),
        ("/admin/dlq/export", {"format": "csv"}),
        ("/admin/dlq/export", {"format": "jsonl"}),
        ("/admin/users", {}),
    ]:
        r = http.get(path, params=params)
        assert r.status_code == 200, (path, r.text[:500])
    named = {b["user"] for b in http.get("/admin/ratelimit/blocked").json()}
    named |= {e["user"] for e in http.get("/admin/audit", params={"limit": 1000}).json()}
    for user in sorted(u for u in named if u):
        r = http.get(f"/admin/ratelimit/status/{quote(user, safe='')}")
        assert r.status_code in (200, 404), (user, r.text[:500])
    assert http.get("/admin/audit").json(), "the fuzz changed nothing: it did not reach the API"
    assert all(e["actor"] == OPERATOR for e in http.get("/admin/audit").json())

"""Admin state routes on a real Redis: token required, audited, bad ids refused (4xx, no
500), GET shows what a host would load, DELETE resets while keeping the version moving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from pydantic import SecretStr

from qywx_ray.admin.errors import install_error_handlers
from qywx_ray.admin.settings import AdminSettings
from qywx_ray.admin.state import make_state_router
from qywx_ray.consume.dedup import RedisDoneStore
from qywx_ray.consume.state import STATE_KEY, RedisStateStore, StateSlot, StateWrite
from qywx_ray.protect.audit import AuditLog
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis

pytestmark = pytest.mark.integration

TOKEN = "state-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Env:
    def __init__(self, http: httpx.AsyncClient, aredis: Any) -> None:
        self.http = http
        self.redis = aredis


@pytest.fixture
async def env(
    redis_client: redis.Redis, make_settings: Callable[..., Settings]
) -> AsyncIterator[Env]:
    aredis = make_async_redis(make_settings().redis)
    app = FastAPI()
    install_error_handlers(app)
    admin = AdminSettings(operators={"alice": SecretStr(TOKEN)})
    app.include_router(make_state_router(aredis, AuditLog(aredis), admin, state_ttl_s=3600))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin", timeout=10) as c:
        yield Env(c, aredis)
    await aredis.aclose()


async def commit(env: Env, user: str, version: int, data: bytes, mid: str) -> set[str]:
    store = RedisDoneStore(env.redis, ttl_s=600, state_ttl_s=7200)
    return await store.commit([], [(mid, StateWrite(user, version, data))], f"op-{mid}")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_the_token_is_required(env: Env, redis_client: redis.Redis, method: str) -> None:
    await commit(env, "u1", 0, b'{"step":"menu"}', "m1")
    before = redis_client.dump(STATE_KEY.format("u1"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = await env.http.request(method, "/admin/users/u1/state", headers=headers)
        assert r.status_code == 401, r.text
    assert redis_client.dump(STATE_KEY.format("u1")) == before
    assert redis_client.llen("qywx:audit") == 0  # nothing was read or changed


@pytest.mark.parametrize(
    "path",
    [
        "/admin/users/a%20b/state",  # space
        "/admin/users/a*/state",  # a wildcard
        "/admin/users/" + "x" * 129 + "/state",  # too long
        "/admin/users/%E2%9C%93/state",  # non-ASCII
    ],
)
async def test_bad_ids_are_422_and_nothing_is_touched(
    env: Env, redis_client: redis.Redis, path: str
) -> None:
    for method in ("GET", "DELETE"):
        r = await env.http.request(method, path, headers=AUTH)
        assert r.status_code == 422, (method, r.text)
    assert redis_client.dbsize() == 0


async def test_read_reset_and_a_stale_commit_after_the_reset(
    env: Env, redis_client: redis.Redis
) -> None:
    r = await env.http.get("/admin/users/nobody/state", headers=AUTH)
    assert r.status_code == 404
    assert await commit(env, "u1", 0, b'{"step":"menu","turns":1}', "m1") == set()
    r = await env.http.get("/admin/users/u1/state", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["version"] == 1
    assert body["state"] == {"step": "menu", "turns": 1}
    assert body["size_bytes"] == 25
    assert 7000 < body["ttl_s"] <= 7200

    r = await env.http.delete("/admin/users/u1/state?reason=ticket%2042", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"user": "u1", "version": 2}
    assert (await env.http.get("/admin/users/u1/state", headers=AUTH)).status_code == 404
    assert (await env.http.delete("/admin/users/u1/state", headers=AUTH)).status_code == 404
    # A host that loaded version 1 before the reset cannot write over it ...
    assert await commit(env, "u1", 1, b'{"step":"paid","turns":2}', "m2") == {"m2"}
    # ... and the next activation starts from an empty state at version 2.
    slot = (await RedisStateStore(env.redis).load(["u1"]))["u1"]
    assert slot == StateSlot(2, b"")
    assert 3000 < redis_client.ttl(STATE_KEY.format("u1")) <= 3600

    entries = [(e["actor"], e["action"], e["user"], e["reason"]) for e in await audit(env)]
    assert entries == [  # newest first; the DELETE that found nothing changed nothing
        ("alice", "state_read", "u1", ""),
        ("alice", "state_delete", "u1", "ticket 42"),
        ("alice", "state_read", "u1", ""),
        ("alice", "state_read", "nobody", ""),
    ]


async def test_an_old_layout_hash_is_read_and_reset(env: Env, redis_client: redis.Redis) -> None:
    """A state stored before the string layout (a hash: v, data) is shown and reset like
    a new one; the reset writes the string layout (consume/state.py)."""
    key = STATE_KEY.format("old")
    redis_client.hset(key, mapping={"v": 4, "data": b'{"step":"menu"}'})
    r = await env.http.get("/admin/users/old/state", headers=AUTH)
    assert r.status_code == 200
    assert (r.json()["version"], r.json()["state"]) == (4, {"step": "menu"})
    r = await env.http.delete("/admin/users/old/state", headers=AUTH)
    assert r.json() == {"user": "old", "version": 5}
    assert redis_client.type(key) == b"string"
    slot = (await RedisStateStore(env.redis).load(["old"]))["old"]
    assert slot == StateSlot(5, b"")


async def audit(env: Env) -> list[dict[str, Any]]:
    raw = await env.redis.lrange("qywx:audit", 0, -1)
    return [json.loads(x) for x in raw]

"""Admin rate-limit API over a real Redis: every endpoint, auth, bad input, audit."""

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
from qywx_ray.admin.ratelimit import make_ratelimit_router
from qywx_ray.admin.settings import AdminSettings
from qywx_ray.protect.decision import Verdict
from qywx_ray.protect.groups import UserGroups
from qywx_ray.protect.ratelimit import RateLimiter
from qywx_ray.protect.settings import ProtectSettings, RateLimitRule
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis

pytestmark = pytest.mark.integration

TOKEN = "s3cret-admin-token-of-alice"  # operator alice's own token
MAIN_TOKEN = "s3cret-main-admin-token"  # the single shared token: operator "admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Env:
    def __init__(self, limiter: RateLimiter, http: httpx.AsyncClient, clock: FakeClock) -> None:
        self.limiter = limiter
        self.http = http
        self.clock = clock


@pytest.fixture
async def env(
    redis_client: redis.Redis, make_settings: Callable[..., Settings]
) -> AsyncIterator[Env]:
    aredis = make_async_redis(make_settings().redis)
    settings = ProtectSettings(user_groups={"cfg-white": "whitelist"})
    clock = FakeClock()
    groups = UserGroups(settings, aredis)
    limiter = RateLimiter(aredis, settings, groups, clock=clock)
    app = FastAPI()
    install_error_handlers(app)
    admin = AdminSettings(token=SecretStr(MAIN_TOKEN), operators={"alice": SecretStr(TOKEN)})
    app.include_router(make_ratelimit_router(limiter, groups, admin))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin", timeout=10) as c:
        yield Env(limiter, c, clock)
    await aredis.aclose()


async def audit(env: Env) -> list[dict[str, Any]]:
    r = await env.http.get("/admin/audit", headers=AUTH)
    assert r.status_code == 200
    return list(r.json())


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/ratelimit/status/u", None),
        ("POST", "/admin/ratelimit/unblock/u", {"reason": "x"}),
        ("POST", "/admin/ratelimit/block/u", {"reason": "x"}),
        ("GET", "/admin/ratelimit/blocked", None),
        ("POST", "/admin/ratelimit/whitelist/u", None),
        ("DELETE", "/admin/ratelimit/whitelist/u", None),
        ("PUT", "/admin/ratelimit/group/u", {"group": "vip"}),
        ("DELETE", "/admin/ratelimit/limit/u", None),
        ("GET", "/admin/audit", None),
    ],
)
async def test_every_route_needs_the_token(
    env: Env, redis_client: redis.Redis, method: str, path: str, body: Any
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = await env.http.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
    assert redis_client.dbsize() == 0  # nothing was changed


async def test_status_of_unknown_user_is_404_and_known_after_traffic(env: Env) -> None:
    r = await env.http.get("/admin/ratelimit/status/nobody", headers=AUTH)
    assert r.status_code == 404
    assert "nobody" in r.json()["detail"]
    await env.limiter.check_batch([("chatty", 7)])
    r = await env.http.get("/admin/ratelimit/status/chatty", headers=AUTH)
    assert r.status_code == 200
    st = r.json()
    assert st["messages_in_window"] == 5
    assert st["violations"] == 2
    assert not st["blocked"]
    assert st["group"] == "default"
    assert st["rule"]["max_messages"] == 5
    # A configured group makes a user known even without traffic.
    r = await env.http.get("/admin/ratelimit/status/cfg-white", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["group"] == "whitelist"


async def test_blocked_list_and_unblock_with_reason(env: Env) -> None:
    await env.limiter.check_batch([("bot", 20)])
    r = await env.http.get("/admin/ratelimit/blocked", headers=AUTH)
    assert r.status_code == 200
    [entry] = r.json()
    assert entry["user"] == "bot"
    assert not entry["permanent"]
    assert entry["blocked_until"] == pytest.approx(T0 + 3600)

    r = await env.http.post("/admin/ratelimit/unblock/bot", headers=AUTH, json={})
    assert r.status_code == 422
    assert "reason" in r.text
    r = await env.http.post("/admin/ratelimit/unblock/bot", headers=AUTH, json={"reason": ""})
    assert r.status_code == 422
    r = await env.http.post(
        "/admin/ratelimit/unblock/bot", headers=AUTH, json={"reason": "customer called"}
    )
    assert r.status_code == 200
    assert r.json() == {"user": "bot", "was_blocked": True}
    assert (await env.limiter.check_batch([("bot", 1)]))["bot"][0].verdict is Verdict.ALLOW
    assert (await env.http.get("/admin/ratelimit/blocked", headers=AUTH)).json() == []
    r = await env.http.post("/admin/ratelimit/unblock/ghost", headers=AUTH, json={"reason": "x"})
    assert r.status_code == 404
    [entry] = await audit(env)
    assert entry["actor"] == "alice"
    assert entry["action"] == "unblock"
    assert entry["user"] == "bot"
    assert entry["reason"] == "customer called"
    assert entry["ts"] == T0


async def test_permanent_and_temporary_block(env: Env) -> None:
    r = await env.http.post("/admin/ratelimit/block/evil", headers=AUTH, json={"reason": "fraud"})
    assert r.status_code == 200
    assert r.json()["permanent"] is True
    env.clock.t += 10 * 365 * 86400
    d = (await env.limiter.check_batch([("evil", 1)]))["evil"][0]
    assert d.verdict is Verdict.BLOCKED
    st = (await env.http.get("/admin/ratelimit/status/evil", headers=AUTH)).json()
    assert st["permanent"]
    assert st["block_reason"] == "fraud"
    assert st["blocked_by"] == "alice"

    r = await env.http.post(
        "/admin/ratelimit/block/temp",
        headers=AUTH,
        json={"reason": "cool down", "permanent": False},
    )
    assert r.status_code == 422
    assert "duration_seconds" in r.text
    r = await env.http.post(
        "/admin/ratelimit/block/temp",
        headers=AUTH,
        json={"reason": "cool down", "permanent": False, "duration_seconds": 60},
    )
    assert r.status_code == 200
    assert r.json()["blocked_until"] == pytest.approx(env.clock.t + 60)
    r = await env.http.post("/admin/ratelimit/block/x", headers=AUTH, json={"permanent": True})
    assert r.status_code == 422
    assert "reason" in r.text
    users = [
        b["user"] for b in (await env.http.get("/admin/ratelimit/blocked", headers=AUTH)).json()
    ]
    assert users == ["evil", "temp"]
    env.clock.t += 61
    assert (await env.limiter.check_batch([("temp", 1)]))["temp"][0].verdict is Verdict.ALLOW
    assert [e["action"] for e in await audit(env)] == ["block", "block"]


async def test_whitelist_add_and_remove(env: Env) -> None:
    r = await env.http.post("/admin/ratelimit/whitelist/boss", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {
        "user": "boss",
        "group": "whitelist",
        "changed": True,
    }
    out = await env.limiter.check_batch([("boss", 100)])
    assert all(d.verdict is Verdict.ALLOW for d in out["boss"])
    r = await env.http.delete("/admin/ratelimit/whitelist/boss?reason=done", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["group"] is None
    out = await env.limiter.check_batch([("boss", 6)])
    assert out["boss"][5].verdict is Verdict.RATE_LIMITED
    r = await env.http.delete("/admin/ratelimit/whitelist/boss", headers=AUTH)
    assert r.status_code == 404
    r = await env.http.delete("/admin/ratelimit/whitelist/cfg-white", headers=AUTH)
    assert r.status_code == 409
    assert "configuration" in r.json()["detail"]
    r = await env.http.put(
        "/admin/ratelimit/group/sus", headers=AUTH, json={"group": "suspicious", "reason": "r"}
    )
    assert r.status_code == 200
    out = await env.limiter.check_batch([("sus", 4)])
    assert [d.verdict for d in out["sus"]][-1] is Verdict.BLOCKED  # 3 allowed, 1st violation
    r = await env.http.put("/admin/ratelimit/group/sus", headers=AUTH, json={"group": "gold"})
    assert r.status_code == 400
    assert "unknown group" in r.json()["detail"]
    actions = [(e["action"], e["user"]) for e in await audit(env)]
    assert actions == [("set_group", "sus"), ("whitelist_remove", "boss"), ("set_group", "boss")]


async def test_temporary_limit_override(env: Env) -> None:
    body = {
        "window_seconds": 10,
        "max_messages": 50,
        "penalty_threshold": 5,
        "block_hours": 1,
        "duration_seconds": 3600,
        "reason": "campaign",
    }
    r = await env.http.put("/admin/ratelimit/limit/promo", headers=AUTH, json=body)
    assert r.status_code == 200
    assert r.json()["expires_at"] == pytest.approx(T0 + 3600)
    out = await env.limiter.check_batch([("promo", 50)])
    assert all(d.verdict is Verdict.ALLOW for d in out["promo"])
    st = (await env.http.get("/admin/ratelimit/status/promo", headers=AUTH)).json()
    assert st["group_source"] == "override"
    assert st["override_expires_at"] == T0 + 3600

    bad: list[tuple[dict[str, Any], int, str]] = [
        ({**body, "duration_seconds": -5}, 422, "greater than 0"),
        ({**body, "duration_seconds": 0}, 422, "greater than 0"),
        ({**body, "duration_seconds": "two hours"}, 422, "valid number"),
        ({**body, "expires_at": T0 + 10}, 422, "exactly one"),
        ({k: v for k, v in body.items() if k != "duration_seconds"}, 422, "exactly one"),
        ({**body, "duration_seconds": 10**9}, 422, "less than or equal"),
        ({**body, "duration_seconds": 40 * 86400}, 400, "maximum"),  # protect setting
        ({**body, "duration_seconds": None, "expires_at": T0 - 1}, 400, "not in the future"),
        ({**body, "max_messages": 0}, 422, "max_messages"),
    ]
    for payload, code, text in bad:
        r = await env.http.put("/admin/ratelimit/limit/promo", headers=AUTH, json=payload)
        assert r.status_code == code, (payload, r.text)
        assert text in r.text, (payload, r.text)

    r = await env.http.delete("/admin/ratelimit/limit/promo", headers=AUTH)
    assert r.status_code == 204
    r = await env.http.delete("/admin/ratelimit/limit/promo", headers=AUTH)
    assert r.status_code == 404
    actions = [e["action"] for e in await audit(env)]
    assert actions == ["clear_limit", "set_limit"]


async def test_audit_filter_and_limit(env: Env) -> None:
    for i in range(5):
        await env.http.post(f"/admin/ratelimit/block/u{i}", headers=AUTH, json={"reason": "r"})
    r = await env.http.get("/admin/audit?limit=2", headers=AUTH)
    assert [e["user"] for e in r.json()] == ["u4", "u3"]
    r = await env.http.get("/admin/audit?user=u1", headers=AUTH)
    assert [e["user"] for e in r.json()] == ["u1"]
    r = await env.http.get("/admin/audit?limit=0", headers=AUTH)
    assert r.status_code == 422


async def test_openapi_schema_names_the_models(env: Env) -> None:
    schema = (await env.http.get("/openapi.json")).json()
    names = set(schema["components"]["schemas"])
    assert {"UserStatus", "BlockedUser", "LimitBody", "AuditEntry", "ReasonBody"} <= names


async def test_override_with_huge_threshold_never_breaks_the_batch(
    env: Env, redis_client: redis.Redis
) -> None:
    """Issue 16.1: Lua formatted 10**14 as '1e+14' and the client's int() failed after the
    script had already counted every user of the batch; on redelivery an innocent user was
    blocked. Numbers crossing Lua are integers, so the batch decodes and only userT is
    limited."""
    rule = RateLimitRule(
        window_seconds=10, max_messages=1, penalty_threshold=10**14, block_hours=1.0
    )
    await env.limiter.set_override("userT", rule, T0 + 600)
    for _ in range(3):  # the same batch redelivered
        out = await env.limiter.check_batch([("userT", 2), ("innocent", 1)])
        assert out["userT"][1].verdict is Verdict.RATE_LIMITED
        assert out["innocent"][0].verdict is Verdict.ALLOW
    st = await env.limiter.status("innocent")
    assert not st.blocked
    assert st.violations == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("penalty_threshold", 10**14),
        ("max_messages", 10**18),
        ("window_seconds", 0.0001),  # rounds to a 0-ms window
        ("block_hours", 1e18),
        ("window_seconds", "NaN"),
        ("block_hours", "Infinity"),
        ("duration_seconds", "Infinity"),
        ("duration_seconds", 1e18),
    ],
)
async def test_limit_numbers_out_of_bounds_are_422_and_not_stored(
    env: Env, redis_client: redis.Redis, field: str, value: Any
) -> None:
    body: dict[str, Any] = {
        "window_seconds": 10,
        "max_messages": 5,
        "penalty_threshold": 3,
        "block_hours": 1,
        "duration_seconds": 600,
    }
    body[field] = value
    raw = json.dumps(body).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    r = await env.http.put(
        "/admin/ratelimit/limit/userT",
        content=raw,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert field in r.text
    assert redis_client.hget("qywx:rl:overrides", "userT") is None
    assert await audit(env) == []


@pytest.mark.parametrize("value", [1e18, "Infinity", "NaN", 0])
async def test_block_duration_out_of_bounds_is_422_and_not_stored(
    env: Env, redis_client: redis.Redis, value: Any
) -> None:
    raw = json.dumps({"reason": "x", "permanent": False, "duration_seconds": value})
    raw = raw.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
    r = await env.http.post(
        "/admin/ratelimit/block/userB",
        content=raw,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert redis_client.zscore("qywx:rl:blocked", "userB") is None
    assert await audit(env) == []


async def test_actor_comes_from_the_token_not_from_a_header(env: Env) -> None:
    """Issue 16.10: X-Admin-User was trusted, so anyone with the token could act as anyone.
    The actor is the operator whose token matched; the header changes nothing."""
    for token, who in ((TOKEN, "alice"), (MAIN_TOKEN, "admin")):
        r = await env.http.post(
            f"/admin/ratelimit/block/by-{who}",
            headers={"Authorization": f"Bearer {token}", "X-Admin-User": "mallory"},
            json={"reason": "spam"},
        )
        assert r.status_code == 200
        assert r.json()["blocked_by"] == who
    assert [e["actor"] for e in await audit(env)] == ["admin", "alice"]


async def test_audit_log_strips_control_characters(env: Env) -> None:
    """Issue 16.10: reasons and user ids reached the audit log with ESC/CR/LF/NUL and bidi
    overrides, which forge lines and colours in a terminal reading it."""
    r = await env.http.post(
        "/admin/ratelimit/block/u%1B%5B2Jx",  # u ESC [2J x: clears a terminal
        headers=AUTH,
        json={"reason": "fine\r\n2026-01-01 admin unblock\x00\u202eevil\x07"},
    )
    assert r.status_code == 200
    [entry] = await audit(env)
    assert entry["reason"] == "fine2026-01-01 admin unblockevil"
    assert entry["user"] == "u[2Jx"
    st = (await env.http.get("/admin/ratelimit/blocked", headers=AUTH)).json()
    assert st[0]["reason"] == "fine2026-01-01 admin unblockevil"


async def test_reason_of_only_control_characters_is_refused(
    env: Env, redis_client: redis.Redis
) -> None:
    r = await env.http.post(
        "/admin/ratelimit/block/u1", headers=AUTH, json={"reason": "\x00\r\n\u202e"}
    )
    assert r.status_code == 422
    assert "reason" in r.text
    assert redis_client.zscore("qywx:rl:blocked", "u1") is None
    assert await audit(env) == []

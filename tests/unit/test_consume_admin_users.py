"""GET /admin/users: auth and the injected source (no Ray)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from qywx_ray.admin.users import make_users_router
from qywx_ray.consume.introspect import format_users


def test_users_route_needs_token_and_passes_filters() -> None:
    calls: list[tuple[int, str | None]] = []

    def source(limit: int, user: str | None) -> dict[str, Any]:
        calls.append((limit, user))
        row = {
            "user": "u1",
            "mode": "hosted",
            "host": "qywx-user-host-0",
            "state": "active",
            "queue_depth": 3,
            "busy": True,
            "last_active": 1.0,
            "processed": 9,
        }
        return {"users": [row], "total": 1, "hosts": [], "missing": []}

    app = FastAPI()
    app.include_router(make_users_router(source, SecretStr("tok")))
    client = TestClient(app)
    assert client.get("/admin/users").status_code == 401
    r = client.get("/admin/users?limit=5&user=u1", headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200
    assert r.json()["users"][0]["queue_depth"] == 3
    assert calls == [(5, "u1")]
    assert "u1" in format_users(r.json())

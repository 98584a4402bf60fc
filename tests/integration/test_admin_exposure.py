"""What the ingress app shows to a client without the admin token.

The admin API shares the public listener, so in the production profile the OpenAPI schema
(which lists every admin route) needs the admin token, the HTML docs are off, and /readyz
says only a status word: no broker addresses or Redis error text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from qywx_ray.settings import Settings

pytestmark = pytest.mark.integration

TOKEN = "exposure-test-admin-token-0123456789"


class NullSink:
    def submit(self, event: Any) -> None:
        return None


def app_for(settings: Settings) -> httpx.AsyncClient:
    from qywx_ray.ingress.app import create_app

    app = create_app(settings, sink=NullSink())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingress")


def production(make_settings: Callable[..., Settings], **extra: Any) -> Settings:
    return make_settings(
        profile="production",
        admin={"token": TOKEN},
        wecom={
            "token": "exposure-test-callback-token",
            "encoding_aes_key": "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut",
            "kf_secret": "exposure-test-kf-secret",
            "corp_id": "wwexposuretest0001",
        },
        **extra,
    )


async def test_production_docs_need_the_admin_token(
    make_settings: Callable[..., Settings],
) -> None:
    async with app_for(production(make_settings)) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = await http.get(path)
            assert r.status_code in (401, 404), (path, r.status_code)
            assert "/admin/" not in r.text
        r = await http.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert "/admin/ratelimit/limit/{user}" in r.json()["paths"]
        r = await http.get("/openapi.json", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401


async def test_development_docs_stay_open(make_settings: Callable[..., Settings]) -> None:
    async with app_for(make_settings()) as http:
        assert (await http.get("/openapi.json")).status_code == 200
        assert (await http.get("/docs")).status_code == 200


async def test_production_readiness_is_a_status_word(
    make_settings: Callable[..., Settings],
) -> None:
    settings = production(
        make_settings,
        redis={"url": "redis://127.0.0.1:1/0"},
        kafka={"bootstrap_servers": "127.0.0.1:1"},
    )
    async with app_for(settings) as http:
        r = await http.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable"}
    assert "127.0.0.1" not in r.text
    assert "refused" not in r.text.lower()

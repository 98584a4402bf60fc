"""Where the admin API listens: off on the public ingress by default.

The ingress is what WeCom reaches on 0.0.0.0:8000; admin routes are mounted there only when
`admin.enabled` is set (config/development.yaml sets it for the demo). `create_admin_app`
is the same admin API alone, served by `qywx-ray admin serve` on a loopback port.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qywx_ray.admin.app import create_admin_app
from qywx_ray.ingress.app import create_app
from qywx_ray.settings import Settings, load_settings
from qywx_ray.wecom.models import KfCallbackEvent


class _Sink:
    def submit(self, event: KfCallbackEvent) -> None:
        return None


def _paths(app: FastAPI) -> set[str]:
    """The routes the app serves, as its OpenAPI schema lists them (every route here is in
    the schema; included routers are not flat `app.routes` entries in current FastAPI)."""
    return set(app.openapi()["paths"])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("QYWX_"):
            monkeypatch.delenv(key)


def test_code_default_and_production_keep_admin_off_the_ingress() -> None:
    assert Settings().admin.enabled is False
    prod = load_settings(profile="production", allow_default_secrets=True)
    assert prod.admin.enabled is False
    paths = _paths(create_app(prod, sink=_Sink()))
    assert "/wecom/callback" in paths
    assert not any(p.startswith("/admin") for p in paths), sorted(paths)
    with TestClient(create_app(prod, sink=_Sink())) as client:
        r = client.get("/admin/dlq/stats", headers={"Authorization": "Bearer x"})
        assert r.status_code == 404
        assert "/admin/" not in client.get("/openapi.json").text


def test_development_profile_mounts_admin_for_the_demo() -> None:
    dev = load_settings(profile="development")
    assert dev.admin.enabled is True
    paths = _paths(create_app(dev, sink=_Sink()))
    assert {"/admin/dlq/stats", "/admin/users"} <= paths
    assert not any(p.startswith("/admin") for p in _paths(create_app(dev, admin=False)))


def test_admin_app_has_admin_routes_without_the_callback() -> None:
    dev = load_settings(profile="development")
    paths = _paths(create_admin_app(dev, users=False))
    assert "/admin/dlq/stats" in paths
    assert "/admin/users" not in paths
    assert "/wecom/callback" not in paths
    with TestClient(create_admin_app(dev, users=False)) as client:
        assert client.get("/admin/dlq/stats").status_code == 401  # the bearer token still rules

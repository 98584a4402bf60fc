"""The production profile refuses default, demo and placeholder secrets.

Every entry point loads settings through `load_settings`, so refusing there covers the CLI
(tests/integration/test_cli.py runs it), the Serve application builder (here) and the demo;
doctor reports the same findings instead of refusing.
"""

from __future__ import annotations

import pytest

from qywx_ray.doctor import _secrets_check, format_checks
from qywx_ray.errors import ConfigError
from qywx_ray.secret_policy import secret_findings
from qywx_ray.settings import load_settings

REAL = {
    "QYWX_ADMIN__TOKEN": "k7Vq2mXr9TbL4wPz8NcY",
    "QYWX_WECOM__CORP_ID": "ww0123456789abcdef",
    "QYWX_WECOM__TOKEN": "T0ken123abc",
    "QYWX_WECOM__ENCODING_AES_KEY": "Q" * 43,
    "QYWX_WECOM__KF_SECRET": "s3cr3tValue99",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: a developer's exported QYWX_* must not decide the outcome."""
    import os

    for key in list(os.environ):
        if key.startswith("QYWX_"):
            monkeypatch.delenv(key)


def _real(monkeypatch: pytest.MonkeyPatch, **override: str) -> None:
    for key, value in {**REAL, **override}.items():
        monkeypatch.setenv(key, value)


def test_production_with_shipped_defaults_is_refused_naming_every_field() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(profile="production")
    text = str(err.value)
    for field in (
        "admin.token (QYWX_ADMIN__TOKEN): the built-in default",
        "wecom.corp_id (QYWX_WECOM__CORP_ID): the built-in demo value",
        "wecom.token (QYWX_WECOM__TOKEN)",
        "wecom.encoding_aes_key (QYWX_WECOM__ENCODING_AES_KEY)",
        "wecom.kf_secret (QYWX_WECOM__KF_SECRET)",
    ):
        assert field in text, text
    assert "change-me-admin-token" not in text  # a finding names the field, never the value


def test_only_the_default_admin_token_left_is_enough_to_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _real(monkeypatch)
    monkeypatch.delenv("QYWX_ADMIN__TOKEN")
    with pytest.raises(ConfigError, match=r"admin\.token \(QYWX_ADMIN__TOKEN\)") as err:
        load_settings(profile="production")
    assert "wecom." not in str(err.value)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("change-me-please-now-1234", "a placeholder value"),
        ("PLACEHOLDER_ADMIN_TOKEN_0001", "a placeholder value"),
        ("password", "a placeholder value"),
        ("short7Token", "shorter than 16 characters"),
        ("   ", "empty"),
    ],
)
def test_placeholder_and_weak_admin_tokens_are_refused(
    monkeypatch: pytest.MonkeyPatch, token: str, reason: str
) -> None:
    _real(monkeypatch, QYWX_ADMIN__TOKEN=token)
    with pytest.raises(ConfigError, match=rf"admin\.token \(QYWX_ADMIN__TOKEN\): {reason}"):
        load_settings(profile="production")


def test_placeholder_redis_password_is_refused_and_none_is_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _real(monkeypatch)
    assert load_settings(profile="production").redis.password == ""
    monkeypatch.setenv("QYWX_REDIS__PASSWORD", "changeme")
    with pytest.raises(ConfigError, match=r"redis\.password \(QYWX_REDIS__PASSWORD\)"):
        load_settings(profile="production")


def test_production_with_real_secrets_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    _real(monkeypatch)
    s = load_settings(profile="production")
    assert s.profile == "production"
    assert secret_findings(s) == []


def test_development_keeps_the_demo_values() -> None:
    s = load_settings(profile="development")
    assert s.admin.token.get_secret_value() == "change-me-admin-token"
    assert {f.field for f in secret_findings(s)} >= {"admin.token", "wecom.token"}


def test_explicit_opt_out_is_needed_to_load_production_defaults() -> None:
    s = load_settings(profile="production", allow_default_secrets=True)
    assert s.profile == "production"


def test_serve_app_builder_refuses_production_defaults() -> None:
    from serve.app import build_app

    with pytest.raises(ConfigError, match=r"admin\.token \(QYWX_ADMIN__TOKEN\)"):
        build_app({"profile": "production"})


def test_serve_app_builder_builds_with_real_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.serve import Application

    from serve.app import build_app

    _real(monkeypatch)
    assert isinstance(build_app({"profile": "production"}), Application)


def test_doctor_reports_the_same_findings() -> None:
    prod = load_settings(profile="production", allow_default_secrets=True)
    check = _secrets_check(prod)
    assert not check.ok
    assert check.status == "FAIL"
    for finding in secret_findings(prod):
        assert str(finding) in check.detail
    assert "change-me-admin-token" not in format_checks([check])

    dev = load_settings(profile="development")
    check = _secrets_check(dev)
    assert check.ok
    assert check.warn
    assert "admin.token" in check.detail


def test_doctor_secrets_ok_with_real_values(monkeypatch: pytest.MonkeyPatch) -> None:
    _real(monkeypatch)
    check = _secrets_check(load_settings(profile="production"))
    assert check.ok, check
    assert not check.warn, check

"""Which secrets the production profile refuses: built-in defaults, demo values, placeholders.

One function judges the settings; `load_settings` raises on its findings for the production
profile (so the CLI, `serve run serve.app:build_app` and anything else that loads settings
stop with exit code 2 before touching Kafka, Redis or Ray), and `qywx-ray doctor` prints the
same findings. A finding names the settings field and its environment variable, never the
value: the values are secrets, and a built-in default is no less a secret once deployed.

It must never accept the shipped defaults in production: the repository is public, so
`change-me-admin-token` or the demo EncodingAESKey is a credential anyone can use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qywx_ray.admin.settings import AdminSettings
from qywx_ray.wecom.settings import WeComSettings

if TYPE_CHECKING:
    from qywx_ray.settings import Settings

PRODUCTION_PROFILE = "production"
# A bearer token shorter than this is guessable; `openssl rand -hex 32` gives 64.
MIN_ADMIN_TOKEN_CHARS = 16
# Lower-cased substrings that mark a value as a placeholder someone forgot to replace.
_PLACEHOLDER_MARKS = (
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "replaceme",
    "placeholder",
    "example",
    "dummy",
    "default",
    "your-",
    "xxxx",
)
# Whole values that are never secrets.
_WELL_KNOWN = frozenset(
    {"admin", "password", "passw0rd", "secret", "token", "test", "qwerty", "letmein"}
    | {"123456", "12345678", "changeit", "root", "guest"}
)


@dataclass(frozen=True)
class SecretFinding:
    """One refused setting: its dotted field, the env var that sets it, and why."""

    field: str
    env: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field} ({self.env}): {self.reason}"


def _plain(value: Any) -> str:
    return str(value.get_secret_value() if hasattr(value, "get_secret_value") else value)


def _placeholder(value: str) -> bool:
    low = value.strip().lower()
    return low in _WELL_KNOWN or any(mark in low for mark in _PLACEHOLDER_MARKS)


def _admin_token_problem(token: str, default: str) -> str | None:
    if not token.strip():
        return "empty"
    if token == default:
        return "the built-in default"
    if _placeholder(token):
        return "a placeholder value"
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        return f"shorter than {MIN_ADMIN_TOKEN_CHARS} characters"
    return None


def secret_findings(settings: Settings) -> list[SecretFinding]:
    """Every secret (and the demo corp_id) that must not be used in production.

    Judged whatever the profile, so doctor can show them in development too; only the
    production profile refuses them (`is_enforced`)."""
    found: list[SecretFinding] = []
    demo_wecom, demo_admin = WeComSettings(), AdminSettings()

    admin_problem = _admin_token_problem(_plain(settings.admin.token), _plain(demo_admin.token))
    if admin_problem:
        found.append(SecretFinding("admin.token", "QYWX_ADMIN__TOKEN", admin_problem))

    # Operator tokens: length and uniqueness are checked by AdminSettings itself.
    for operator, token in settings.admin.operators.items():
        if _placeholder(_plain(token)):
            found.append(
                SecretFinding(
                    f"admin.operators.{operator}", "QYWX_ADMIN__OPERATORS", "a placeholder value"
                )
            )

    for name in ("corp_id", "token", "encoding_aes_key", "kf_secret"):
        field, env = f"wecom.{name}", f"QYWX_WECOM__{name.upper()}"
        value = _plain(getattr(settings.wecom, name))
        if not value.strip():
            found.append(SecretFinding(field, env, "empty"))
        elif value == _plain(getattr(demo_wecom, name)):
            found.append(SecretFinding(field, env, "the built-in demo value"))
        elif _placeholder(value):
            found.append(SecretFinding(field, env, "a placeholder value"))

    # No password is a deployment choice (a private network, as in docker-compose.yml);
    # a placeholder password is a mistake.
    redis_password = settings.redis.password
    if redis_password and _placeholder(redis_password):
        found.append(SecretFinding("redis.password", "QYWX_REDIS__PASSWORD", "a placeholder value"))
    return found


def is_enforced(settings: Settings) -> bool:
    """The production profile refuses findings; development and tests run on demo values."""
    return settings.profile == PRODUCTION_PROFILE


def refusal_message(findings: list[SecretFinding]) -> str:
    """The ConfigError text: every field named, with how to fix it; no value printed."""
    return (
        "the production profile refuses default or demo secrets: "
        + "; ".join(str(f) for f in findings)
        + ". Set real values through the environment (see SECURITY.md)"
    )

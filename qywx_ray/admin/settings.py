"""Admin API settings: whether the admin API is served, who may call it, under which name.

Each operator has their own bearer token (`operators`, name -> token), so the audit log
records who acted from the credential itself, never from a header the client chooses.
The single `token` stays valid and acts as operator "admin". Tokens are never logged.

The admin API is off on the public ingress unless `enabled` is set: the ingress listens on
0.0.0.0:8000 for WeCom, and admin routes there are one leaked token away from anyone who
can reach the callback URL. config/development.yaml turns it on (the demo, on 127.0.0.1);
in production prefer `qywx-ray admin serve` (loopback-bound, its own port) over enabling it
on the ingress. SECURITY.md has the whole picture.
"""

from __future__ import annotations

import re
from typing import Self

from pydantic import BaseModel, Field, SecretStr, model_validator

ADMIN_OPERATOR = "admin"  # the name the single shared `token` acts under
MIN_OPERATOR_TOKEN_CHARS = 16
_OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class AdminSettings(BaseModel):
    token: SecretStr = SecretStr("change-me-admin-token")
    # Mount the admin routers on the public ingress app (qywx_ray/ingress/app.py create_app).
    enabled: bool = False
    operators: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="operator name -> that operator's own bearer token "
        '(env: QYWX_ADMIN__OPERATORS=\'{"alice": "..."}\')',
    )

    @model_validator(mode="after")
    def _one_token_per_operator(self) -> Self:
        seen = {self.token.get_secret_value(): ADMIN_OPERATOR}
        for name, token in self.operators.items():
            if not _OPERATOR_NAME.fullmatch(name) or name == ADMIN_OPERATOR:
                raise ValueError(
                    f"admin.operators: {name!r} is not a valid operator name "
                    "(letters, digits, . _ @ -, at most 64, not 'admin')"
                )
            value = token.get_secret_value()
            if len(value) < MIN_OPERATOR_TOKEN_CHARS:
                raise ValueError(
                    f"admin.operators.{name}: the token needs at least "
                    f"{MIN_OPERATOR_TOKEN_CHARS} characters"
                )
            if value in seen:
                raise ValueError(
                    f"admin.operators.{name}: the token is also {seen[value]!r}'s; "
                    "one token per operator, or the audit log cannot tell them apart"
                )
            seen[value] = name
        return self

    def credentials(self) -> list[tuple[str, SecretStr]]:
        """(operator, token) pairs: "admin" with the single token first."""
        return [(ADMIN_OPERATOR, self.token), *sorted(self.operators.items())]

"""Admin API settings: who may call the admin API, and under which name.

Each operator has their own bearer token (`operators`, name -> token), so the audit log
records who acted from the credential itself, never from a header the client chooses.
The single `token` stays valid and acts as operator "admin". Tokens are never logged.
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

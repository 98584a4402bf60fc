"""Bearer-token auth shared by every admin router.

Constant-time comparison; the token comes from settings (env `QYWX_ADMIN__TOKEN`).
The caller's identity for audit logs is the `X-Admin-User` header (default "admin").
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

_bearer = HTTPBearer(auto_error=False)


def require_admin(token: SecretStr) -> Callable[..., str]:
    """A FastAPI dependency that returns the acting admin's name or raises 401."""

    def dependency(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        x_admin_user: Annotated[str | None, Header()] = None,
    ) -> str:
        expected = token.get_secret_value().encode()
        given = (credentials.credentials if credentials else "").encode()
        if not credentials or not hmac.compare_digest(given, expected):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid admin bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return (x_admin_user or "admin")[:64]

    return dependency

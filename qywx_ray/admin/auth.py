"""Bearer-token auth shared by every admin router; the token names the operator.

The acting operator (for the audit log) is derived from the credential: the operator whose
token matched (admin.operators), or "admin" for the single admin.token. No header can
change it. Every configured token is compared in constant time, all of them on every
request, so timing tells nothing about which token came close.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from qywx_ray.admin.settings import AdminSettings

_bearer = HTTPBearer(auto_error=False)


def require_admin(admin: AdminSettings | SecretStr) -> Callable[..., str]:
    """A FastAPI dependency that returns the acting operator's name or raises 401.

    A bare SecretStr is the single token (operator "admin"), for callers that have no
    operator table."""
    settings = admin if isinstance(admin, AdminSettings) else AdminSettings(token=admin)
    table = [(name, token.get_secret_value().encode()) for name, token in settings.credentials()]

    def dependency(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> str:
        given = (credentials.credentials if credentials else "").encode()
        actor = ""
        for name, expected in table:
            if hmac.compare_digest(given, expected) and not actor:
                actor = name
        if not credentials or not actor:
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="missing or invalid admin bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return actor

    return dependency

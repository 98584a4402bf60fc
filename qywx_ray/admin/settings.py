"""Admin API settings."""

from __future__ import annotations

from pydantic import BaseModel, SecretStr


class AdminSettings(BaseModel):
    token: SecretStr = SecretStr("change-me-admin-token")

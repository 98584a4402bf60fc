"""Admin API settings.

The admin API is off on the public ingress unless `enabled` is set: the ingress listens on
0.0.0.0:8000 for WeCom, and admin routes there are one leaked token away from anyone who
can reach the callback URL. config/development.yaml turns it on (the demo, on 127.0.0.1);
in production prefer `qywx-ray admin serve` (loopback-bound, its own port) over enabling it
on the ingress. SECURITY.md has the whole picture.
"""

from __future__ import annotations

from pydantic import BaseModel, SecretStr


class AdminSettings(BaseModel):
    token: SecretStr = SecretStr("change-me-admin-token")
    # Mount the admin routers on the public ingress app (serve/app.py create_app).
    enabled: bool = False

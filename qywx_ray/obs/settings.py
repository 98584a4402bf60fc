"""Observability settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ObsSettings(BaseModel):
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    metrics_port: int = 0  # 0: only via Ray's metrics export / the Serve /metrics route

"""Dead-letter settings."""

from __future__ import annotations

from pydantic import BaseModel


class DLQSettings(BaseModel):
    emergency_dir: str = ""  # default: <data_dir>/dlq-emergency
    max_retries: int = 10
    backoff_base_s: float = 60.0
    backoff_max_s: float = 3600.0
    ttl_s: float = 7 * 86_400.0
    park_rate_limited: bool = False
    scheduler_interval_s: float = 1.0

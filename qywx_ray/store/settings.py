"""Redis connection settings: one single instance or Sentinel, chosen by config, same code."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, model_validator


class RedisSettings(BaseModel):
    mode: Literal["single", "sentinel"] = "single"
    url: str = "redis://127.0.0.1:6379/0"
    master_name: str = "mymaster"
    sentinel_addrs: list[str] = []
    db: int = 0
    password: str = ""
    socket_timeout_s: float = 2.0
    # Connections per client pool; when all are busy a caller waits (bounded by
    # pool_timeout_s) instead of failing.
    max_connections: int = 128
    pool_timeout_s: float = 5.0

    @model_validator(mode="after")
    def _sentinel_needs_addrs(self) -> RedisSettings:
        if self.mode == "sentinel" and not self.sentinel_addrs:
            raise ValueError("redis.mode=sentinel needs redis.sentinel_addrs (host:port list)")
        return self

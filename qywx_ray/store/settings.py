"""Redis connection settings: one single instance or Sentinel, chosen by config, same code."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


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
    # Every command rides a failover: on connection/timeout/read-only/NOREPLICAS errors it
    # reconnects (in sentinel mode: asks the sentinels for the master again) and retries
    # with exponential backoff (base, doubling, capped) until `retry_budget_s` has passed
    # since the command started; only then does the caller see the error. Size the budget
    # above sentinel `down-after-milliseconds` + election (~1-2 s) for a crashed master; a
    # requested failover takes ~1-2 s. 0 disables retries.
    retry_budget_s: float = Field(default=10.0, ge=0)
    retry_backoff_base_s: float = Field(default=0.05, gt=0)
    retry_backoff_cap_s: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _sentinel_needs_addrs(self) -> RedisSettings:
        if self.mode == "sentinel" and not self.sentinel_addrs:
            raise ValueError("redis.mode=sentinel needs redis.sentinel_addrs (host:port list)")
        return self

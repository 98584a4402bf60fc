"""Consume settings: partition consumers, user actors, dedup, handler."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ConsumeSettings(BaseModel):
    mode: Literal["hosted", "dedicated"] = "hosted"
    num_consumers: int = Field(default=2, ge=1)
    num_hosts: int = Field(default=4, ge=1)
    mailbox_size: int = Field(default=1000, ge=1)
    idle_lifetime_s: float = 10_800.0  # 3 h
    max_dedicated_actors: int = 100
    max_inflight_per_consumer: int = 50_000
    commit_every_messages: int = 1000
    commit_interval_s: float = 1.0
    revoke_wait_s: float = 10.0
    handler: str = "qywx_ray.consume.handlers:default_handler"
    handler_timeout_s: float = 30.0
    handler_concurrency: int = 1000
    dedup_ttl_s: int = 86_400
    redis_down_policy: Literal["stop", "process"] = "stop"

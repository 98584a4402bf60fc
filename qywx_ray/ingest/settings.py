"""Ingest settings: pulling kf/sync_msg and producing to Kafka."""

from __future__ import annotations

from pydantic import BaseModel


class IngestSettings(BaseModel):
    sync_page_limit: int = 1000
    sweep_interval_s: float = 30.0
    lock_ttl_s: float = 30.0
    lock_extend_every_s: float = 10.0
    delivery_wait_timeout_s: float = 30.0
    serve_replicas: int = 1
    serve_max_ongoing_requests: int = 256

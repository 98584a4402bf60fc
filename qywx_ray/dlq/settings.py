"""Dead-letter settings: DLQ producer, emergency file, recovery service, delay queue, parking."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator


class DLQSettings(BaseModel):
    # Absolute (`~` expanded); empty = <data_dir>/dlq-emergency. Never relative: a Ray
    # actor's working directory is Ray's, not ours, so a relative path would scatter
    # letters where neither the background replay nor an operator looks.
    emergency_dir: str = ""
    # The DLQ producer's owner replays the emergency file in the background: every this
    # many seconds while it has entries (0 = off; `qywx-ray dlq replay-emergency` still
    # works), backing off up to the max while the DLQ topic refuses them.
    emergency_replay_interval_s: float = Field(default=5.0, ge=0)
    emergency_replay_backoff_max_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=10, ge=0)
    backoff_base_s: float = Field(default=60.0, gt=0)
    backoff_max_s: float = Field(default=3600.0, gt=0)
    ttl_s: float = 7 * 86_400.0
    park_rate_limited: bool = False
    scheduler_interval_s: float = 1.0
    # Producer: how long a DLQ write may take before the emergency file takes it.
    produce_timeout_s: float = Field(default=10.0, gt=0)
    breaker_failure_threshold: int = Field(default=10, ge=1)
    breaker_open_s: float = Field(default=60.0, gt=0)
    # The producer's own threads for blocking sends (never the loop's default executor,
    # which hung work elsewhere in a host could fill).
    send_threads: int = Field(default=8, ge=1)
    # Recovery service.
    recovery_group_id: str = "qywx-dlq-recovery"
    recovery_actor_name: str = "qywx-dlq-recovery"
    consume_batch_max: int = Field(default=500, ge=1)
    schedule_batch_max: int = Field(default=500, ge=1)
    lease_s: float = Field(default=60.0, gt=0)  # a claimed retry not acked by then is re-queued
    retry_produce_timeout_s: float = Field(default=15.0, gt=0)
    redis_prefix: str = "qywx:dlq"

    @field_validator("emergency_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value:
            return value
        path = Path(value).expanduser()
        if not path.is_absolute():
            raise ValueError(f"must be an absolute path, got {value!r}")
        return str(path)

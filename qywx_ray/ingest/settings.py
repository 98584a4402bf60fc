"""Ingest settings: pulling kf/sync_msg and producing to Kafka."""

from __future__ import annotations

from pydantic import BaseModel, Field

from qywx_ray.wecom.errcodes import ErrCode


class IngestSettings(BaseModel):
    sync_page_limit: int = Field(default=1000, ge=1, le=1000)
    sweep_interval_s: float = 30.0
    lock_ttl_s: float = 30.0
    lock_extend_every_s: float = 10.0
    delivery_wait_timeout_s: float = 30.0
    serve_replicas: int = 1
    serve_max_ongoing_requests: int = 256
    # A callback token is valid 10 min at WeCom; stop using it a little earlier.
    callback_token_valid_s: float = 540.0
    # Back-pressure: how long one produce may wait for room in librdkafka's queue.
    produce_block_timeout_s: float = 10.0
    # Retry of a failed pull (WeCom 45009/-1, Kafka and Redis both down, ...).
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    # kf/sync_msg errcodes meaning "this cursor is not accepted": the pull restarts from
    # the oldest message WeCom still keeps (duplicates, never a gap) and alerts. 40058 is
    # WeCom's invalid-parameter code, what the simulator answers for a rejected cursor;
    # add others here if WeCom is seen to answer a rejected cursor differently.
    invalid_cursor_errcodes: list[int] = [int(ErrCode.INVALID_PARAM)]
    # A pull found the lock held by another node: try again this soon.
    busy_retry_s: float = 1.0
    # Producer circuit breaker: consecutive failed deliveries before it opens.
    breaker_failure_threshold: int = 50
    breaker_cooldown_s: float = 10.0
    # Spool replayer.
    spool_replay_interval_s: float = 2.0
    spool_replay_max_per_user: int = 200
    spool_replay_max_batch: int = 2000
    key_prefix: str = "qywx"
    # Syncer hosts (named detached actors `qywx-syncer-host-{i}`); open_kfids placed by hash.
    num_syncer_hosts: int = Field(default=1, ge=1)
    # open_kfids to sweep from the start, before any callback names them.
    open_kfids: list[str] = []
    # The callback path coalesces pull requests for this long before one Ray call per host.
    callback_flush_interval_s: float = 0.01
    # Callback load shedding (ingress/shedding.py): above this many callbacks in flight in
    # one replica, or this much event-loop lag, answer 200 at once without decrypting
    # (0 disables a signal). Shed callbacks wait in a backlog of this many entries.
    callback_shed_max_inflight: int = Field(default=128, ge=0)
    callback_shed_max_loop_lag_s: float = Field(default=0.5, ge=0)
    callback_shed_backlog: int = Field(default=10_000, ge=0)
    # ... and of at most this many bytes (query + body). Only signed, fresh callbacks
    # enter it, once per signature; 16 MiB holds ~30,000 real (~500-byte) callbacks.
    callback_shed_backlog_max_bytes: int = Field(default=16 << 20, ge=0, le=1 << 30)
    # After a shed, every known open_kfid is pulled within this delay (one request per host).
    callback_shed_sweep_delay_s: float = Field(default=1.0, gt=0)
    # Under a callback burst, at most one pull request per syncer host this often.
    callback_min_send_interval_s: float = Field(default=0.1, ge=0)
    # Serve writes one access-log line per request in the replica; at hundreds of
    # callbacks/s that is CPU on the callback path (the metrics count them anyway).
    serve_access_log: bool = False

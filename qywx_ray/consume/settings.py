"""Consume settings: partition consumers, user actors, dedup, handler."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator


class ConsumeSettings(BaseModel):
    mode: Literal["hosted", "dedicated"] = "hosted"
    # Partition consumer actors: at most the partition count. A consumer only routes
    # (~15 µs a message: one routes 20,000+ msg/s), so add them for more nodes, not for
    # cores; each consumer x host pair is its own stream of small batches (2 consumers on
    # 2 cores: p99 at 2,000 msg/s 139-164 ms against 38-62 ms with one).
    num_consumers: int = Field(default=1, ge=1)
    # Host actors for hosted users. Each adds a fixed cost per delivery batch (a Ray call,
    # Redis round trips, a completion call): about one per core is right; more hosts on
    # the same cores raised the p99 at 2,000 msg/s here from ~60 ms to over 150 ms.
    num_hosts: int = Field(default=2, ge=1)
    # Ray placement of our named detached actors: `{name_prefix}-user-host-{i}`,
    # `{name_prefix}-consumer-{i}`, `user:{open_kfid}:{external_userid}` in `namespace`.
    namespace: str = "qywx"
    name_prefix: str = "qywx"
    mailbox_size: int = Field(default=1000, ge=1)
    idle_lifetime_s: float = 10_800.0  # 3 h
    idle_sweep_interval_s: float = 5.0  # how often a host looks for idle mailboxes
    # Per pipeline, counted in Redis across all consumers (consume/placement.py); users
    # beyond it are hosted, and a user keeps its first placement while it is active.
    max_dedicated_actors: int = 100
    # Dedicated mode: spare actors kept started for new users (consume/dedicated_pool.py).
    # A new user's first message then waits for a Ray call instead of a Ray worker
    # process start (1-2 per second on 2 cores, seconds each in a burst). Each spare is
    # a live process (~70 MiB of node memory, ~0.7 % of a core idle): size it to the burst of new
    # dedicated users expected within one refill. 0 = no pool.
    dedicated_pool_size: int = Field(default=0, ge=0)
    # Spares started at a time (consumer 0 keeps the pool). Refills run beside the claims:
    # at 2 the claims of a 50-user burst waited p99 1.2-2.8 s, at 1 0.2 s, and the pool
    # filled at 0.6-0.7 instead of 0.9-1.2 starts/s (2 cores, docs/benchmarks.md).
    dedicated_pool_starts_at_once: int = Field(default=1, ge=1, le=64)
    max_inflight_per_consumer: int = 50_000
    # Poll batches leave at most this often: under load the records that arrive meanwhile
    # ride along (batching vs latency); a record after a quiet spell leaves at once.
    # (kafka.consumer.poll_timeout_s bounds only the wait for a first record.)
    poll_linger_ms: float = Field(default=15.0, ge=0)
    commit_every_messages: int = 1000
    commit_interval_s: float = 1.0
    revoke_wait_s: float = 10.0
    completion_flush_ms: float = 20.0  # hosts batch completions back to consumers
    health_check_interval_s: float = 1.0  # consumer probes hosts holding its in-flight work
    static_membership: bool = True  # group.instance.id per consumer: a restart takes over at once
    handler: str = "qywx_ray.consume.handlers:default_handler"
    handler_timeout_s: float = 30.0
    # Per host: handlers running at once (across users). Kept below the asyncio Redis
    # pool's 100 connections so Redis-using handlers never hit "Too many connections".
    handler_concurrency: int = Field(default=64, ge=1)
    # Per host: threads for synchronous handlers (async ones need none). A sync handler
    # past its timeout keeps its thread; when such hung threads hold all of them the
    # host crashes so Ray restarts it (consume/handler_threads.py).
    handler_threads: int = Field(default=32, ge=1)
    dedup_ttl_s: int = 86_400
    dedup_recent_size: int = 100_000  # in-memory recent-done LRU per host
    # Per-user state of a handler declared `@stateful` (consume/state.py): the key
    # expires this long after its last change (default 30 days); a success whose encoded
    # state is larger than `state_max_bytes` is a dead letter `state_too_large`.
    state_ttl_s: int = Field(default=30 * 86_400, ge=60)
    state_max_bytes: int = Field(default=64 * 1024, ge=16, le=16 * 1024 * 1024)
    redis_down_policy: Literal["stop", "process"] = "stop"
    redis_retry_max_s: float = 5.0  # backoff cap while Redis is down (policy stop)
    # A handler failing because our Redis is unreachable (or failing over) is retried in
    # place this long (backoff up to redis_retry_max_s) before it becomes a dead letter.
    handler_infra_retry_s: float = Field(default=60.0, ge=0)
    transcript_max_len: int = 200  # default handler: messages kept per user
    reply_enabled: bool = False  # default handler: reply via WeCom kf/send_msg
    record_key: str = "qywx:test:record"  # recording handler (tests, bench)
    # Hooks into protect/ and dlq/: "module:factory", factory(settings) -> hook.
    # Rate limiting (allow-all when protect.enabled is false); empty = allow all.
    admission: str = "qywx_ray.protect.admission:make_admission"
    # -> consume.types.DeadLetterSink (the DLQ record format, read by the recovery actor).
    dead_letter_sink: str = "qywx_ray.dlq.sink:make_sink"
    # -> consume.types.RetryOrder: per-user order across retries; empty = no parking.
    retry_order: str = "qywx_ray.dlq.parking:make_async_parking"
    park_drain_chunk: int = Field(default=200, ge=1)  # parked messages taken per round trip

    @model_validator(mode="after")
    def _pool_within_cap(self) -> ConsumeSettings:
        if self.dedicated_pool_size > self.max_dedicated_actors:
            raise ValueError(
                f"consume.dedicated_pool_size ({self.dedicated_pool_size}) exceeds "
                f"consume.max_dedicated_actors ({self.max_dedicated_actors}): more spares "
                "than users that may hold a dedicated actor at once"
            )
        return self

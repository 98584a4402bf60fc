"""What a seed decides: the scenario (sizes, options) and every fault, drawn from
independent streams so each subsystem's draws do not shift the others'.

Fault kinds can be switched off by name (`run.py --without cancel,process`), which is
how a failing seed is narrowed down to the fault that matters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

KINDS = (
    "redis_down",  # Redis unreachable for a while (every Redis-backed fake raises)
    "lost_reply",  # a Redis write applied but its reply lost (the caller sees an error)
    "deny",  # the rate limiter denies rate_limited
    "dlq_fail",  # a dead-letter write fails (the host retries it)
    "host_crash",  # a host dies; a new one starts over the same durable world
    "consumer_restart",  # a partition is re-assigned: redelivery from the committed offset
    "retryable",  # handler raises a retryable error (downstream_error)
    "permanent",  # handler raises PermanentError (invalid_message)
    "timeout",  # handler runs past handler_timeout_s (process_timeout)
    "cancel",  # handler raises asyncio.CancelledError
    "blip",  # handler sees our Redis unreachable (InfraError: retried in place)
    "queue_full",  # tiny mailboxes
    "breaker",  # per-user circuit breaker on
    "process",  # redis_down_policy = process
    "idle",  # short idle lifetime: mailboxes die and are re-created
)

OUTCOMES = ("ok", "retryable", "permanent", "timeout", "cancel", "blip")


@dataclass
class Config:
    seed: int
    partitions: int
    hosts: int
    users: int
    messages: int
    produce_span_s: float  # messages are produced during [0, produce_span_s)
    fault_span_s: float  # faults happen during [0, fault_span_s); then none
    batch_max: int
    mailbox_size: int
    breaker: tuple[int, float, int] | None  # failure_threshold, open_seconds, success_threshold
    policy: str
    handler_timeout_s: float
    handler_concurrency: int
    drain_chunk: int
    idle_lifetime_s: float
    outcome_weights: dict[str, float]
    p_deny: float
    p_lost_reply: float
    p_dlq_fail: float
    max_retries: int
    backoff_base_s: float
    redis_outages: list[tuple[float, float]] = field(default_factory=list)
    host_crashes: list[tuple[float, int]] = field(default_factory=list)
    consumer_restarts: list[tuple[float, int]] = field(default_factory=list)

    @classmethod
    def draw(cls, seed: int, without: frozenset[str] = frozenset()) -> Config:
        r = random.Random(f"config:{seed}")

        def on(kind: str, p: float) -> bool:
            return kind not in without and r.random() < p

        partitions = r.randint(1, 3)
        hosts = r.randint(1, 2)
        fault_span = r.uniform(8.0, 20.0)
        weights = {"ok": 1.0}
        for kind, p, w in (
            ("retryable", 0.6, 0.25),
            ("permanent", 0.3, 0.08),
            ("timeout", 0.3, 0.08),
            ("cancel", 0.15, 0.05),
            ("blip", 0.3, 0.1),
        ):
            weights[kind] = r.uniform(0.01, w) if on(kind, p) else 0.0
        cfg = cls(
            seed=seed,
            partitions=partitions,
            hosts=hosts,
            users=r.randint(1, 5),
            messages=r.randint(5, 40),
            produce_span_s=r.uniform(0.5, fault_span * 0.7),
            fault_span_s=fault_span,
            batch_max=r.choice((1, 2, 4, 8, 32)),
            mailbox_size=r.randint(1, 3) if on("queue_full", 0.25) else 1000,
            breaker=(r.randint(1, 3), r.uniform(0.2, 3.0), r.randint(1, 2))
            if on("breaker", 0.2)
            else None,
            policy="process" if on("process", 0.25) else "stop",
            handler_timeout_s=r.uniform(0.2, 2.0),
            handler_concurrency=r.randint(1, 6),
            drain_chunk=r.choice((1, 2, 3, 200)),
            idle_lifetime_s=r.uniform(0.2, 3.0) if on("idle", 0.2) else 10_800.0,
            outcome_weights=weights,
            p_deny=r.uniform(0.02, 0.2) if on("deny", 0.3) else 0.0,
            p_lost_reply=r.uniform(0.02, 0.2) if on("lost_reply", 0.3) else 0.0,
            p_dlq_fail=r.uniform(0.05, 0.4) if on("dlq_fail", 0.3) else 0.0,
            max_retries=r.randint(1, 4),
            backoff_base_s=r.uniform(0.1, 2.0),
        )
        if on("redis_down", 0.4):
            for _ in range(r.randint(1, 3)):
                cfg.redis_outages.append((r.uniform(0, fault_span), r.uniform(0.05, 3.0)))
        if on("host_crash", 0.25):
            for _ in range(r.randint(1, 2)):
                cfg.host_crashes.append((r.uniform(0, fault_span), r.randrange(hosts)))
        if on("consumer_restart", 0.3):
            for _ in range(r.randint(1, 3)):
                cfg.consumer_restarts.append((r.uniform(0, fault_span), r.randrange(partitions)))
        return cfg

    def summary(self) -> str:
        used = [k for k, w in self.outcome_weights.items() if w and k != "ok"]
        parts = [
            f"partitions={self.partitions} hosts={self.hosts} users={self.users}",
            f"messages={self.messages} batch_max={self.batch_max} policy={self.policy}",
            f"mailbox={self.mailbox_size} breaker={self.breaker}",
            f"concurrency={self.handler_concurrency} chunk={self.drain_chunk}",
            f"handler_faults={used} deny={self.p_deny:.2f} lost_reply={self.p_lost_reply:.2f}",
            f"dlq_fail={self.p_dlq_fail:.2f} outages={len(self.redis_outages)}",
            f"crashes={len(self.host_crashes)} restarts={len(self.consumer_restarts)}",
            f"max_retries={self.max_retries}",
        ]
        return " ".join(parts)


class Faults:
    """The seeded draws, one stream per subsystem; `active` False once faults stop."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.active = True
        s = cfg.seed
        self._handler = random.Random(f"handler:{s}")
        self._redis = random.Random(f"redis:{s}")
        self._deny = random.Random(f"deny:{s}")
        self._dlq = random.Random(f"dlq:{s}")
        self._recovery = random.Random(f"recovery:{s}")
        self._kafka = random.Random(f"kafka:{s}")

    def outcome(self) -> str:
        r = self._handler.random()
        if not self.active:
            return "ok"
        total = sum(self.cfg.outcome_weights.values())
        x = r * total
        for kind in OUTCOMES:
            x -= self.cfg.outcome_weights.get(kind, 0.0)
            if x < 0:
                return kind
        return "ok"

    def handler_time(self) -> float:
        return self._handler.choice((0.0, 0.001, 0.005, 0.02, 0.05))

    def redis_latency(self) -> float:
        return self._redis.uniform(0.0002, 0.002)

    def lose_reply(self) -> bool:
        return self._redis.random() < self.cfg.p_lost_reply and self.active

    def deny(self) -> bool:
        return self._deny.random() < self.cfg.p_deny and self.active

    def dlq_latency(self) -> float:
        return self._dlq.uniform(0.001, 0.01)

    def dlq_fails(self) -> bool:
        return self._dlq.random() < self.cfg.p_dlq_fail and self.active

    def recovery_tick(self) -> float:
        return self._recovery.uniform(0.05, 0.3)

    def recovery_jitter(self) -> float:
        return self._recovery.uniform(0.0, 1.0)

    def poll_tick(self) -> float:
        return self._kafka.uniform(0.005, 0.05)

    def batch_size(self) -> int:
        return self._kafka.randint(1, self.cfg.batch_max)

    def drop_msg_id_header(self) -> bool:
        return self._kafka.random() < 0.2

    def restart_delay(self) -> float:
        return self._kafka.uniform(0.05, 1.0)

"""Thin Ray shell over RecoveryService: one named, detached, self-restarting actor.

All logic lives in dlq/recovery.py. The actor starts its loops in __init__, so a restart
after a crash (max_restarts=-1) resumes consuming and scheduling with nothing lost: the
DLQ offsets and the delay queue are durable. It must never hold state that matters.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from qywx_ray.dlq.recovery import RecoveryService
from qywx_ray.obs.logging import configure_logging
from qywx_ray.placement import actor_options, where
from qywx_ray.settings import Settings


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DLQRecoveryActor:
    def __init__(self, settings: Settings) -> None:
        configure_logging(settings.obs.log_level, settings.obs.log_format)
        blocked_until = None
        if settings.protect.enabled:
            from qywx_ray.dlq.blocks import LimiterBlockedUntil

            blocked_until = LimiterBlockedUntil(settings)
        self._service = RecoveryService(
            settings, node_id=socket.gethostname(), blocked_until=blocked_until
        )
        self._service.run_in_background()
        self._topic = settings.kafka.dlq_topic.name

    def __repr__(self) -> str:
        # Ray shows this in the dashboard and log prefixes (taken once, after __init__).
        return f"DLQRecoveryActor(topic={self._topic})"

    def where(self) -> dict[str, Any]:
        return where()

    def ping(self) -> str:
        return "ok"

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        return self._service.stats()

    def stop(self, timeout_s: float = 10.0) -> int:
        """Graceful: loops finish their batch, DLQ group left, producer flushed, leases
        handed back to the delay queue (returns how many). Call before ray.kill."""
        return self._service.close(timeout_s)


def start_recovery_actor(settings: Settings, *, name: str | None = None) -> Any:
    """Get or create the detached recovery actor (`qywx-dlq-recovery` unless `name`)."""
    return DLQRecoveryActor.options(  # type: ignore[attr-defined]
        name=name or settings.dlq.recovery_actor_name,
        namespace=settings.ray_namespace,
        lifetime="detached",
        get_if_exists=True,
        **actor_options(settings.placement, "dlq_recovery"),
    ).remote(settings)

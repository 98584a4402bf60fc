"""What a host reports outward: completed offsets, in batches, and its counters.

Completions leave in one call per consumer every `completion_flush_ms` (a Ray call per
message would cost more than the handler); metrics are counted in plain ints and
published with each flush, off the hot path. Latency samples (Kafka timestamp -> handler
start, and -> the batch reaching the host) are bounded by `latency_samples`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from qywx_ray.consume.types import CompletionSink, Delivery
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, gauge, histogram
from qywx_ray.obs.stats import percentiles

log = get_logger(__name__)

m_processed = counter(
    "qywx_messages_processed_total", "Messages finished by user actors", ["result"]
)
m_failures = counter("qywx_handler_failures_total", "Messages dead-lettered, by reason", ["reason"])
m_seconds = histogram("qywx_processing_seconds", "Handler wall time per message")
m_active = gauge("qywx_active_user_actors", "Live user mailboxes/actors in this host", ["host"])

# Published as qywx_messages_processed_total{result}: our count name -> its label.
_RESULTS = {"processed": "ok", "duplicate": "duplicate", "dead_letter": "dead_letter"}


class HostReport:
    """A host's completion batches, counters and latency samples."""

    def __init__(
        self,
        name: str,
        completions: CompletionSink,
        *,
        flush_ms: float,
        latency_samples: int,
        active: Callable[[], int],
    ) -> None:
        self.name = name
        self.active = active  # live mailboxes, published as a gauge with each flush
        self.completions = completions
        self.flush_ms = flush_ms
        self.latency_samples = latency_samples
        self.latencies_ms: list[int] = []  # Kafka timestamp -> handler start
        self.arrival_ms: list[int] = []  # Kafka timestamp -> batch reaches this host
        self.counts: dict[str, int] = {
            "processed": 0,
            "duplicate": 0,
            "dead_letter": 0,
            "parked": 0,
            "unparked": 0,
            "admission_bypassed": 0,
        }
        self._published: dict[str, int] = {}
        self._durations_s: list[float] = []
        self._out: dict[str, list[tuple[str, int, int]]] = {}
        self._flush_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ samples

    def arrived(self, age_ms: int) -> None:
        if len(self.arrival_ms) < self.latency_samples:
            self.arrival_ms.append(age_ms)

    def started(self, d: Delivery, start_ms: int) -> None:
        """A handler starts on `d` (a Kafka record: drained lot items have no partition)."""
        if d.partition >= 0 and len(self.latencies_ms) < self.latency_samples:
            self.latencies_ms.append(start_ms - d.timestamp_ms)

    def ran(self, seconds: float) -> None:
        self._durations_s.append(seconds)

    def take_latencies(self, reset: bool) -> list[int]:
        out = list(self.latencies_ms)
        if reset:
            self.latencies_ms = []
            self.arrival_ms = []
        return out

    def latency_stats(self, reset: bool = False) -> dict[str, Any]:
        xs, arrivals = self.latencies_ms, self.arrival_ms
        if reset:
            self.latencies_ms = []
            self.arrival_ms = []
        q = percentiles(xs, (50, 99, 100)) if xs else {}
        a = percentiles(arrivals, (50, 99)) if arrivals else {}
        return {
            "n": len(xs),
            "p50_ms": q.get(50),
            "p99_ms": q.get(99),
            "max_ms": q.get(100),
            "arrival_p50_ms": a.get(50),
            "arrival_p99_ms": a.get(99),
        }

    # ------------------------------------------------------------ completions

    def complete(self, d: Delivery) -> None:
        """`d` is durably finished: report it with the next flush."""
        self._out.setdefault(d.consumer, []).append(d.tpo)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_ms / 1000.0)
        self.flush_completions()

    @property
    def completions_pending(self) -> int:
        return sum(len(v) for v in self._out.values())

    def flush_completions(self) -> None:
        self.flush_metrics()
        out, self._out = self._out, {}
        for consumer, done in out.items():
            try:
                self.completions.complete(consumer, done)
            except Exception as exc:  # noqa: BLE001 - the consumer re-delivers what it never heard about
                log.warning("host.completion_lost", consumer=consumer, n=len(done), error=str(exc))

    def flush_metrics(self) -> None:
        """Metrics leave the hot path: counted locally, published with each flush."""
        for result, label in _RESULTS.items():
            delta = self.counts[result] - self._published.get(result, 0)
            if delta:
                m_processed.inc(delta, result=label)
                self._published[result] = self.counts[result]
        durations, self._durations_s = self._durations_s, []
        for d in durations:
            m_seconds.observe(d)
        m_active.set(self.active(), host=self.name)

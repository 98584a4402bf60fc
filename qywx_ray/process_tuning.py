"""Process tuning shared by the long-lived hot-path actors (consume hosts, partition
consumers, syncer hosts), and a record of the collector's pauses in them."""

from __future__ import annotations

import gc
import time
from collections import deque
from typing import Any

GC_GEN0_THRESHOLD = 20_000
LONG_PAUSE_MS = 10.0  # a pause this long is kept with its time (evidence for a p99 outlier)
LONG_PAUSES_KEPT = 64


def tune_gc() -> None:
    """For long-lived hot-path actors, once set up: move everything built so far (Ray,
    pydantic, httpx, modules: a large heap) out of the collector's sight, and collect
    young objects less often. The per-message objects (envelopes, parsed pages) are
    acyclic and freed by refcount; with the default thresholds the cyclic collector
    walked the whole heap every few batches. Measured: up to ~40 % of a consume host's
    CPU; a syncer host's CPU fell from 35.1 to 29.3 µs/msg (bench/bench_syncer.py
    one_account, 5 pairs). Also starts timing the collector's pauses (`gc_pauses`)."""
    freeze_heap()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    gc_pauses.install()


def freeze_heap() -> None:
    """Collect once, then move every object alive now out of the collector's sight: later
    full collections walk only what is made afterwards. Frozen objects are still freed by
    refcount; frozen cyclic garbage never is (a small, one-off leak per call)."""
    gc.collect()
    gc.freeze()


class GcPauses:
    """Times every collection of this process (gc.callbacks): counts and totals per
    generation, and the last pauses of at least LONG_PAUSE_MS with their wall-clock end,
    so a latency outlier can be matched to a pause (host and consumer snapshots carry
    them; bench_consume's steady windows read them). The collector stops every thread of
    the process while it runs: a full collection over a host's mailboxes stalls every
    user of that host.

    The callback only updates plain fields. It must not touch obs.metrics: a collection
    can start inside a metric update that holds that module's (non-reentrant) lock, and
    a callback taking the lock again would deadlock the thread."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._installed = False
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.long: deque[tuple[float, int, float]] = deque(maxlen=LONG_PAUSES_KEPT)

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        ms = (time.perf_counter() - self._t0) * 1000.0
        gen = int(info.get("generation", 2))
        self.count[gen] += 1
        self.total_ms[gen] += ms
        if ms >= LONG_PAUSE_MS:
            self.long.append((time.time(), gen, round(ms, 2)))

    def stats(self) -> dict[str, Any]:
        """Counts and total ms per generation since install, and the recent long pauses
        as [unix time of its end, generation, ms]."""
        return {
            "count": list(self.count),
            "total_ms": [round(t, 2) for t in self.total_ms],
            "long": [list(p) for p in self.long],
        }


gc_pauses = GcPauses()

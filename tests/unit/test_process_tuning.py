"""GcPauses: the collector's pauses are counted per generation, long ones kept with their
time."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import pytest

from qywx_ray import process_tuning
from qywx_ray.process_tuning import GcPauses


@pytest.fixture(autouse=True)
def only_explicit_collections() -> Iterator[None]:
    """Counts are exact: no automatic collection (pytest allocates plenty) may add one."""
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> Iterator[GcPauses]:
    monkeypatch.setattr(process_tuning, "LONG_PAUSE_MS", 0.0)  # keep every pause
    recorder = GcPauses()
    recorder.install()
    recorder.install()  # idempotent: one callback
    yield recorder
    recorder.uninstall()
    assert recorder._on_gc not in gc.callbacks


def test_a_full_collection_is_timed_and_kept(pauses: GcPauses) -> None:
    t0 = time.time()
    gc.collect(2)
    stats = pauses.stats()
    assert stats["count"][2] == 1  # one callback per collection, not two
    assert stats["total_ms"][2] > 0
    ((end, _gen, ms),) = [p for p in stats["long"] if p[1] == 2]
    assert ms > 0
    assert t0 <= end <= time.time()


def test_young_collections_count_apart(pauses: GcPauses) -> None:
    gc.collect(0)
    gc.collect(1)
    assert pauses.stats()["count"][:2] == [1, 1]
    assert pauses.stats()["count"][2] == 0


def test_only_pauses_over_the_threshold_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_tuning, "LONG_PAUSE_MS", 10_000.0)
    recorder = GcPauses()
    recorder.install()
    try:
        gc.collect()
    finally:
        recorder.uninstall()
    assert recorder.stats()["count"][2] == 1
    assert recorder.stats()["long"] == []


def test_a_collection_inside_a_metric_update_does_not_deadlock(pauses: GcPauses) -> None:
    """A collection may start while this thread holds obs.metrics' lock (any allocation
    in a metric update): the callback must not take that lock again."""
    from qywx_ray.obs import metrics

    def collect_under_the_lock() -> None:
        with metrics._lock:
            gc.collect()

    worker = threading.Thread(target=collect_under_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the gc callback deadlocked on the metrics lock"
    assert pauses.stats()["count"][2] >= 1

"""GcPauses: the collector's pauses are counted per generation, long ones kept with their
time, and the histogram sees them."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from qywx_ray import process_tuning
from qywx_ray.obs import metrics
from qywx_ray.process_tuning import GcPauses


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
    before = metrics.snapshot().get("qywx_gc_pause_seconds", 0.0)
    t0 = time.time()
    gc.collect(2)
    stats = pauses.stats()
    assert stats["count"][2] == 1  # one callback per collection, not two
    assert stats["total_ms"][2] > 0
    ((end, _gen, ms),) = [p for p in stats["long"] if p[1] == 2]  # young ones may follow
    assert ms > 0
    assert t0 <= end <= time.time()
    assert metrics.snapshot()["qywx_gc_pause_seconds"] > before


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

"""The bucket bookkeeping behind histograms recorded inside Ray workers (obs/metrics.py)."""

from __future__ import annotations

from qywx_ray.obs.metrics import BucketCounts


def test_buckets_are_cumulative_with_le_semantics() -> None:
    b = BucketCounts([0.1, 1.0, 0.01])  # unsorted on purpose
    for v in (0.005, 0.01, 0.5, 1.0, 7.0):
        b.observe(("sync",), v)
    [(key, buckets)] = b.take_changed()
    assert key == ("sync",)
    # a value equal to a bound counts in that bound's bucket (Prometheus `le`)
    assert buckets == [("0.01", 2), ("0.1", 2), ("1.0", 4), ("+Inf", 5)]


def test_only_changed_label_sets_are_republished_and_totals_keep_growing() -> None:
    b = BucketCounts([1.0])
    b.observe(("a",), 0.5)
    b.observe(("b",), 2.0)
    assert [c[0] for c in b.take_changed()] == [("a",), ("b",)]
    assert b.take_changed() == []
    b.observe(("a",), 3.0)
    [(key, buckets)] = b.take_changed()
    assert key == ("a",)
    assert buckets == [("1.0", 1), ("+Inf", 2)]

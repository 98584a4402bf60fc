"""Watermarks: the committed offset never passes an unfinished one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qywx_ray.consume.watermark import CommitPolicy, PartitionWatermark, WatermarkTable


def test_contiguous_done_advances_only_to_first_undone() -> None:
    w = PartitionWatermark()
    assert w.committable() is None
    for o in (10, 11, 12, 15):  # gaps (e.g. transaction markers) are fine
        assert w.add(o)
    w.done(11)
    w.done(15)
    assert w.committable() == 10
    w.done(10)
    assert w.committable() == 12
    w.done(12)
    assert w.committable() == 16
    assert w.inflight == 0


def test_replayed_and_unknown_offsets_are_ignored() -> None:
    w = PartitionWatermark()
    w.add(5)
    assert not w.add(5)
    assert not w.add(3)
    assert not w.done(7)
    assert w.done(5)
    assert not w.done(5)
    assert w.committable() == 6


def test_pending_commit_only_when_advanced() -> None:
    t = WatermarkTable()
    t.get("t", 0).add(0)
    t.get("t", 1).add(0)
    assert t.pending_commits() == {("t", 0): 0, ("t", 1): 0}
    t.mark_committed({("t", 0): 0, ("t", 1): 0})
    assert t.pending_commits() == {}
    t.done("t", 1, 0)
    assert t.pending_commits() == {("t", 1): 1}
    assert t.inflight() == 1
    assert t.inflight("t", 0) == 1


def test_commit_policy_count_and_interval() -> None:
    p = CommitPolicy(every_messages=3, interval_s=1.0)
    assert not p.due(0.0)
    p.record_done(2)
    assert not p.due(0.5)
    p.record_done(1)
    assert p.due(0.6)
    p.committed(0.6)
    p.record_done(1)
    assert not p.due(1.0)
    assert p.due(1.7)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=60),
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=60, max_size=60),
    order=st.randoms(use_true_random=False),
    done_fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_committed_never_exceeds_smallest_undone(
    n: int, gaps: list[int], order: object, done_fraction: float
) -> None:
    offsets = []
    o = 0
    for i in range(n):
        o += gaps[i]
        offsets.append(o)
    w = PartitionWatermark()
    for off in offsets:
        w.add(off)
    finishing = list(offsets)
    order.shuffle(finishing)  # type: ignore[attr-defined]
    finishing = finishing[: int(len(finishing) * done_fraction)]
    done: set[int] = set()
    for off in finishing:
        w.done(off)
        done.add(off)
        undone = [x for x in offsets if x not in done]
        c = w.committable()
        assert c is not None
        if undone:
            assert c <= min(undone)
            assert c == min(undone)  # and it is as far as it safely can be
        else:
            assert c == offsets[-1] + 1

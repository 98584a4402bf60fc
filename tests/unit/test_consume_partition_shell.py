"""The PartitionConsumerCore shell with a fake Kafka consumer, no Ray, no poll thread.

Drives the shell's own steps (`_poll`, `_dispatch`, `complete`, `_commit`) by hand so a
rebalance can land exactly between `poll()` and `consume()`, as librdkafka may do it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from redis.exceptions import RedisError

from qywx_ray.consume import partition_consumer as pc
from qywx_ray.consume.placement import MemoryPlacementStore, Placement
from qywx_ray.settings import Settings

TOPIC = "main"


class FakeMessage:
    def __init__(self, partition: int, offset: int, key: str) -> None:
        self._p, self._o, self._k = partition, offset, key

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes:
        return self._k.encode()

    def value(self) -> bytes:
        return b"{}"

    def headers(self) -> list[tuple[str, bytes]]:
        return [("msg_id", f"m{self._o}".encode()), ("open_kfid", b"kf")]

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000)


class FakeConsumer:
    """poll() hands out queued records; consume() first runs a scripted callback (the
    rebalance librdkafka serves inside the call), then hands out the rest."""

    def __init__(self) -> None:
        self.queue: list[FakeMessage] = []
        self.during_consume: Callable[[], None] | None = None
        self.commits: list[list[tuple[int, int]]] = []
        self.assignment_: list[TopicPartition] = []

    def poll(self, timeout: float) -> FakeMessage | None:
        return self.queue.pop(0) if self.queue else None

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        if self.during_consume is not None:
            hook, self.during_consume = self.during_consume, None
            hook()
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return (0, -1)

    def assignment(self) -> list[TopicPartition]:
        return self.assignment_

    def pause(self, tps: list[TopicPartition]) -> None:
        pass

    def resume(self, tps: list[TopicPartition]) -> None:
        pass


class NoRay:
    """Stands in for the `ray` module: any Ray call fails (as while a name is not yet
    registered), so no test here ever starts a Ray instance."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"no Ray in unit tests (ray.{name})")

        return fail


def make_core(
    monkeypatch: pytest.MonkeyPatch, index: int = 0, **consume: Any
) -> tuple[Any, FakeConsumer]:
    """A core whose poll thread does nothing: the test drives it."""
    monkeypatch.setattr(pc.PartitionConsumerCore, "_run", lambda self: None)
    monkeypatch.setattr(pc, "ray", NoRay())
    monkeypatch.setattr(pc, "get_or_create_user_actor", NoRay().get_or_create_user_actor)
    s = Settings()
    s.kafka.main_topic.name = TOPIC
    for k, v in consume.items():
        setattr(s.consume, k, v)
    c = pc.PartitionConsumerCore(s, index)
    c._thread.join(5)
    fake = FakeConsumer()
    c.consumer = fake  # type: ignore[assignment]
    return c, fake


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, FakeConsumer]:
    return make_core(monkeypatch)


def _tps(*partitions: int) -> list[TopicPartition]:
    return [TopicPartition(TOPIC, p) for p in partitions]


def test_record_polled_before_a_revoke_is_neither_dispatched_nor_committed(
    core: tuple[Any, FakeConsumer],
) -> None:
    """Issue 15 item 3: poll() returns a record, the revoke runs inside the following
    consume(); the record must be dropped, and its completion must not commit anything
    for a partition this consumer no longer owns."""
    c, fake = core
    c._on_assign(fake, _tps(0))
    fake.queue = [FakeMessage(0, 5, "u1")]
    fake.during_consume = lambda: c._on_revoke(fake, _tps(0))
    batch = c._poll(100, 0.0)
    assert len(batch) == 1  # taken by poll() before the revoke ran
    c._dispatch(batch)
    assert c.snapshot()["assigned"] == []
    assert c.snapshot()["inflight"] == 0  # dropped, never tracked
    assert c.complete([(TOPIC, 0, 5)]) == 0  # a late completion is ignored
    c._commit(sync=False)
    assert fake.commits == []
    assert c.snapshot()["committed"] == {}


def test_record_polled_before_a_revoke_and_reassign_is_dropped(
    core: tuple[Any, FakeConsumer],
) -> None:
    """Revoke and re-assign inside the same consume(): the record from the earlier
    assignment is stale (its partition may have been committed further elsewhere)."""
    c, fake = core
    c._on_assign(fake, _tps(0))
    fake.queue = [FakeMessage(0, 5, "u1")]

    def rebalance() -> None:
        c._on_revoke(fake, _tps(0))
        c._on_assign(fake, _tps(0))

    fake.during_consume = rebalance
    c._dispatch(c._poll(100, 0.0))
    assert c.snapshot()["assigned"] == [0]
    assert c.snapshot()["inflight"] == 0
    c.complete([(TOPIC, 0, 5)])
    c._commit(sync=False)
    assert fake.commits == []


def test_owned_records_are_tracked_and_committed_past_completion(
    core: tuple[Any, FakeConsumer],
) -> None:
    c, fake = core
    c._on_assign(fake, _tps(0, 1))
    fake.queue = [FakeMessage(0, 5, "u1"), FakeMessage(1, 7, "u2"), FakeMessage(0, 6, "u1")]
    c._dispatch(c._poll(100, 0.0))
    assert c.snapshot()["inflight"] == 3
    assert c.complete([(TOPIC, 0, 6), (TOPIC, 1, 7)]) == 2
    c._commit(sync=False)
    assert sorted(fake.commits[-1]) == [(0, 5), (1, 8)]  # never past the unfinished 5
    assert c.complete([(TOPIC, 0, 5)]) == 1
    c._commit(sync=False)
    assert fake.commits[-1] == [(0, 7)]
    assert c.stats["completed"] == 3
    assert c.stats["consumed"] == 3


def _targets(c: Any) -> set[str]:
    return set(c.snapshot()["targets"])


def test_dedicated_placement_is_shared_across_a_partition_move(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15 item 8: the consumer that takes a partition over resolves the same target
    for each user as the one before it (here the users arrive in the other order, which
    with a per-consumer placement would have given u2 the free dedicated slot)."""
    store = MemoryPlacementStore()
    opts: dict[str, Any] = {"mode": "dedicated", "max_dedicated_actors": 1, "revoke_wait_s": 0.1}
    a, fa = make_core(monkeypatch, 0, **opts)
    b, fb = make_core(monkeypatch, 1, **opts)
    for c in (a, b):
        c._placement = Placement(store, c.c.max_dedicated_actors)
    host_u2 = a._route_hosted("u2")
    a._on_assign(fa, _tps(0))
    fa.queue = [FakeMessage(0, 1, "u1"), FakeMessage(0, 2, "u2"), FakeMessage(0, 3, "u1")]
    a._dispatch(a._poll(100, 0.0))
    assert _targets(a) == {"user:kf:u1", host_u2}
    assert store.calls == 1  # one round trip for the batch's new users
    a._on_revoke(fa, _tps(0))  # nothing completes: the wait times out, work is dropped
    b._on_assign(fb, _tps(0))
    fb.queue = [FakeMessage(0, 1, "u2"), FakeMessage(0, 2, "u1")]
    b._dispatch(b._poll(100, 0.0))
    assert _targets(b) == {"user:kf:u1", host_u2}
    assert store.calls == 2


def test_dedicated_placement_is_released_only_once_idle_and_the_actor_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryPlacementStore()
    c, fake = make_core(monkeypatch, mode="dedicated", max_dedicated_actors=1)
    c._placement = Placement(store, 1)
    host_u2 = c._route_hosted("u2")
    c._on_assign(fake, _tps(0))
    fake.queue = [FakeMessage(0, 1, "u1"), FakeMessage(0, 2, "u2")]
    c._dispatch(c._poll(100, 0.0))
    assert store.records == {"u1": "user:kf:u1", "u2": host_u2}
    c.complete([(TOPIC, 0, 1), (TOPIC, 0, 2)])
    alive = {"user:kf:u1": True}
    monkeypatch.setattr(c, "_actor_alive", lambda name: alive[name])
    due = c.tracker.due(1e9)  # long idle
    assert sorted(f.user for f in due.forgotten_users) == ["u1", "u2"]
    c._release_placements(due.forgotten_users)
    assert store.records == {"u1": "user:kf:u1"}  # its actor still lives: kept
    assert store.dedicated == {"u1"}
    c._release_placements([])
    assert store.records == {"u1": "user:kf:u1"}
    alive["user:kf:u1"] = False
    c._release_placements([])
    assert store.records == {}
    assert store.dedicated == set()


def test_placement_waiting_for_release_is_kept_when_the_user_returns_or_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryPlacementStore()
    c, fake = make_core(monkeypatch, mode="dedicated", max_dedicated_actors=2)
    c._placement = Placement(store, 2)
    monkeypatch.setattr(c, "_actor_alive", lambda name: True)
    c._on_assign(fake, _tps(0, 1))
    fake.queue = [FakeMessage(0, 1, "u1"), FakeMessage(1, 1, "u2")]
    c._dispatch(c._poll(100, 0.0))
    c.complete([(TOPIC, 0, 1), (TOPIC, 1, 1)])
    c._release_placements(c.tracker.due(1e9).forgotten_users)
    assert set(c._to_release) == {"u1", "u2"}
    fake.queue = [FakeMessage(0, 2, "u1")]  # u1 is back
    c._dispatch(c._poll(100, 0.0))
    c._on_revoke(fake, _tps(1))  # u2's partition moved on: its next owner decides
    monkeypatch.setattr(c, "_actor_alive", lambda name: False)
    c._release_placements([])
    assert c._to_release == {}
    assert store.records == {"u1": "user:kf:u1", "u2": "user:kf:u2"}


class FlakyPlacementStore(MemoryPlacementStore):
    """Refuses `fail` resolves (Redis unreachable), then answers."""

    def __init__(self, fail: int) -> None:
        super().__init__()
        self.fail = fail

    def resolve(self, wants: Any, cap: int) -> list[str]:
        if self.fail:
            self.fail -= 1
            raise RedisError("placement store down")
        return super().resolve(wants, cap)


def test_dedicated_placement_waits_out_a_store_outage_serving_the_poll_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = FlakyPlacementStore(fail=2)
    c, fake = make_core(monkeypatch, mode="dedicated", max_dedicated_actors=1)
    c._placement = Placement(store, 1)
    served: list[int] = []
    monkeypatch.setattr(c, "_service", lambda: served.append(1))
    c._on_assign(fake, _tps(0))
    fake.queue = [FakeMessage(0, 1, "u1")]
    c._dispatch(c._poll(100, 0.0))
    assert store.fail == 0
    assert store.records == {"u1": "user:kf:u1"}  # resolved on the third try
    assert _targets(c) == {"user:kf:u1"}
    assert served  # the backoff kept the consumer's loop served


def test_dedicated_placement_outage_while_stopping_drops_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = FlakyPlacementStore(fail=10**6)
    c, fake = make_core(monkeypatch, mode="dedicated", max_dedicated_actors=1)
    c._placement = Placement(store, 1)
    c._on_assign(fake, _tps(0))
    fake.queue = [FakeMessage(0, 1, "u1")]
    c._stop.set()
    c._dispatch(c._poll(100, 0.0))
    assert store.fail == 10**6 - 1  # one try, then the stop ended the wait
    assert c.snapshot()["inflight"] == 0
    assert _targets(c) == set()

"""The warm pool keeper's decisions (consume/dedicated_pool.py), with fakes for Redis and
Ray: what it starts, when a start becomes a spare, and what it drops or asks for again."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from qywx_ray.consume.dedicated_pool import (
    PoolKeeper,
    run_keeper,
    spare_name,
    starts_due,
    still_listed,
)


class FakeStore:
    def __init__(self) -> None:
        self.spares: set[str] = set()
        self.starting: set[str] = set()
        self.fail_ready = False

    def read(self) -> tuple[set[str], set[str]]:
        return set(self.spares), set(self.starting)

    def intend(self, names: Iterable[str]) -> None:
        self.starting.update(names)

    def ready(self, name: str) -> bool:
        if self.fail_ready:
            raise ConnectionError("redis down")
        if name not in self.starting:
            return False
        self.starting.discard(name)
        self.spares.add(name)
        return True

    def retire(self, name: str) -> bool:
        listed = name in self.spares or name in self.starting
        self.spares.discard(name)
        self.starting.discard(name)
        return listed


class FakeStarter:
    """Records every ask; the test decides which asks answer (True) or fail (False).
    An ask for a name the store does not list as starting or spare is a start nobody
    could find again after a keeper restart: recorded in `unlisted_asks`."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.asks: list[tuple[int, str]] = []
        self.outcome: dict[str, bool] = {}
        self.killed: list[str] = []
        self.gone: set[str] = set()
        self.unlisted_asks: list[str] = []

    def start(self, name: str) -> Any:
        if name not in self.store.starting and name not in self.store.spares:
            self.unlisted_asks.append(name)
        token = len(self.asks)
        self.asks.append((token, name))
        return token

    def exists(self, name: str) -> bool:
        return name not in self.gone

    def answered(self, tokens: list[Any]) -> dict[Any, bool]:
        names = dict(self.asks)
        return {t: self.outcome[names[t]] for t in tokens if names[t] in self.outcome}

    def kill(self, name: str) -> None:
        self.killed.append(name)

    def names(self) -> list[str]:
        return [name for _, name in self.asks]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keeper(store: FakeStore, starter: FakeStarter, clock: Clock, size: int = 3) -> PoolKeeper:
    return PoolKeeper(
        store, starter, name_prefix="p", size=size, at_once=2, start_timeout_s=60, clock=clock
    )


@pytest.mark.parametrize(
    ("size", "spares", "starting", "at_once", "due"),
    [(5, 0, 0, 2, 2), (5, 0, 1, 2, 1), (5, 4, 0, 2, 1), (5, 5, 0, 2, 0), (5, 6, 0, 2, 0),
     (5, 0, 3, 2, 0), (0, 0, 0, 2, 0)],
)  # fmt: skip
def test_starts_due_fills_to_the_size_with_a_bounded_number_starting(
    size: int, spares: int, starting: int, at_once: int, due: int
) -> None:
    assert starts_due(size, spares, starting, at_once) == due


def test_spare_names_are_dedicated_user_actor_names_of_their_own() -> None:
    a, b = spare_name("p"), spare_name("p")
    assert a != b
    assert a.startswith("user:~pool:p:")  # a dedicated target key (placement.is_dedicated)


def test_a_start_is_recorded_before_it_is_asked_and_becomes_a_spare_only_once_answered() -> None:
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    k = keeper(store, starter, clock)
    k.tick()
    first = starter.names()
    assert len(first) == 2  # at_once, not the whole size
    assert store.starting == set(first)
    assert store.spares == set()
    k.tick()  # no answer yet: nothing more started, nothing asked twice
    assert starter.names() == first
    starter.outcome[first[0]] = True
    k.tick()
    assert store.spares == {first[0]}
    third = starter.names()[2:]
    assert len(third) == 1  # one slot freed: one more started, up to the size
    assert store.starting == {first[1], *third}
    for name in starter.names():
        starter.outcome[name] = True
    k.tick()
    assert len(store.spares) == 3
    assert store.starting == set()
    assert k.stats["started"] == 3
    k.tick()
    assert len(starter.names()) == 3  # full: nothing more
    assert starter.unlisted_asks == []  # every name was listed before its start
    assert k.filled_after_s == 0.0


def test_a_failed_start_is_dropped_and_replaced() -> None:
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    k = keeper(store, starter, clock, size=1)
    k.tick()
    (name,) = starter.names()
    starter.outcome[name] = False
    k.tick()
    assert k.stats["failed"] == 1
    assert starter.killed == [name]  # Ray would restart a crashed start, listed nowhere
    assert name not in store.starting
    replacement = starter.names()[1:]
    assert len(replacement) == 1
    assert replacement[0] != name
    assert store.starting == set(replacement)


def test_a_start_that_never_answers_is_killed_after_the_timeout_and_replaced() -> None:
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    k = keeper(store, starter, clock, size=1)
    k.tick()
    (name,) = starter.names()
    clock.now = 59.0
    k.tick()
    assert starter.killed == []
    clock.now = 61.0
    k.tick()
    assert starter.killed == [name]
    assert k.stats["timed_out"] == 1
    assert store.starting == set(starter.names()[1:])


def test_after_a_restart_the_keeper_asks_again_for_starts_and_never_kills_a_spare() -> None:
    """A new keeper (consumer 0 restarted) asks by name for every listed start; a listed
    spare that does not answer in time is left alone: it may have been claimed."""
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    store.spares = {"user:~pool:p:s1"}
    store.starting = {"user:~pool:p:s2"}
    k = keeper(store, starter, clock, size=2)
    k.tick()
    assert starter.names() == ["user:~pool:p:s2"]  # the live spare needs no ask; no new name
    starter.outcome["user:~pool:p:s2"] = True
    clock.now = 100.0
    k.tick()
    assert store.spares == {"user:~pool:p:s1", "user:~pool:p:s2"}
    assert starter.killed == []
    assert k.stats["timed_out"] == 0


def test_after_a_restart_gone_spares_and_spares_beyond_the_size_are_taken_off_the_list() -> None:
    """A pipeline stop kills every user actor but leaves the lists: a spare whose actor is
    gone must not count (nor be claimed as started); a smaller pool retires the extras,
    killing only what it took off the list itself. New starts then come `at_once`."""
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    store.spares = {f"user:~pool:p:s{i}" for i in range(6)}
    starter.gone = {"user:~pool:p:s4", "user:~pool:p:s5"}  # sorted last: counted out first
    k = keeper(store, starter, clock, size=2)
    k.tick()
    assert store.spares == {"user:~pool:p:s2", "user:~pool:p:s3"}
    assert starter.killed == ["user:~pool:p:s0", "user:~pool:p:s1"]  # never a gone one
    assert k.stats["retired"] == 4
    assert store.starting == set()
    # Starts an earlier, larger keeper had begun become spares beyond the size: trimmed.
    store.starting = {"user:~pool:p:s6", "user:~pool:p:s7"}
    k.tick()
    for name in ("user:~pool:p:s6", "user:~pool:p:s7"):
        starter.outcome[name] = True
    k.tick()
    assert len(store.spares) == 2
    assert starter.killed[2:] == ["user:~pool:p:s2", "user:~pool:p:s3"]
    # Most of a pool gone: the survivors count, the rest is started `at_once` at a time.
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    store.spares = {f"user:~pool:p:s{i}" for i in range(4)}
    starter.gone = {"user:~pool:p:s0", "user:~pool:p:s1", "user:~pool:p:s2"}
    k = keeper(store, starter, clock, size=4)
    k.tick()
    assert store.spares == {"user:~pool:p:s3"}
    assert len(store.starting) == 2
    assert k.stats["spares"] == 1
    assert starter.killed == []


def test_a_store_error_leaves_the_answer_for_the_next_tick() -> None:
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    k = keeper(store, starter, clock, size=1)
    k.tick()
    (name,) = starter.names()
    starter.outcome[name] = True
    store.fail_ready = True
    with pytest.raises(ConnectionError):
        k.tick()
    store.fail_ready = False
    k.tick()
    assert store.spares == {name}
    assert starter.names() == [name]  # not started twice


def test_a_start_nobody_waits_for_is_asked_for_again() -> None:
    """A name listed as starting that this keeper is not waiting on (its token was
    settled but the store call failed, or another keeper began it) is asked again."""
    store, clock = FakeStore(), Clock()
    starter = FakeStarter(store)
    k = keeper(store, starter, clock, size=2)
    k.tick()
    store.starting.add("user:~pool:p:other")
    k.tick()
    assert starter.names().count("user:~pool:p:other") == 1
    k.tick()
    assert starter.names().count("user:~pool:p:other") == 1


def test_the_keeper_loop_survives_an_error_and_ends_on_stop() -> None:
    class Flaky:
        def __init__(self) -> None:
            self.ticks = 0

        def tick(self) -> None:
            self.ticks += 1
            if self.ticks == 1:
                raise RuntimeError("GCS hiccup")
            if self.ticks == 3:
                stop.set()

    stop = threading.Event()
    flaky = Flaky()
    worker = threading.Thread(target=run_keeper, args=(flaky, stop, 0.001), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive()
    assert flaky.ticks == 3  # went on after the error, stopped when told


class FakeAsyncRedis:
    """Just the pipeline of SISMEMBERs that `still_listed` sends."""

    def __init__(self, sets: dict[str, set[str]], down: bool = False) -> None:
        self.sets = sets
        self.down = down
        self.calls: list[tuple[str, str]] = []

    def pipeline(self, transaction: bool = True) -> FakeAsyncRedis:
        return self

    async def __aenter__(self) -> FakeAsyncRedis:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def sismember(self, key: str, name: str) -> None:
        self.calls.append((key, name))

    async def execute(self) -> list[bool]:
        if self.down:
            raise RedisConnectionError("down")
        return [name in self.sets.get(key, set()) for key, name in self.calls]


@pytest.mark.parametrize(
    ("sets", "down", "listed"),
    [
        ({"pfx:pool:spares": {"me"}}, False, True),
        ({"pfx:pool:starting": {"me"}}, False, True),
        ({"pfx:pool:spares": {"other"}}, False, False),
        ({}, True, True),  # Redis down: stay a spare
    ],
)
def test_a_spare_is_one_while_either_list_names_it(
    sets: dict[str, set[str]], down: bool, listed: bool
) -> None:
    assert asyncio.run(still_listed(FakeAsyncRedis(sets, down), "pfx", "me")) is listed

"""Dedicated mode's warm pool: spare user actors started before any user needs one.

A dedicated user's actor is a Ray worker process. Started on demand, a new user's first
message waits for that process (on 2 cores Ray starts 1-2 actors a second; a burst of 50
new users waited 13-15 s at p50, docs/benchmarks.md). With `consume.dedicated_pool_size`
> 0, consumer 0 keeps that many spares started, and the placement script
(consume/placement.py) hands a new dedicated user a spare in the same step that decides
its placement (SPOP): the user's record names the spare, and its first message waits for
a Ray call. With no spare left the user gets an actor named after it, started on demand.

Who owns what, so nothing is started twice or leaks:
- A spare is named before it starts (`user:~pool:{name_prefix}:{hex}`) and its name goes
  into the `starting` set first, so a keeper that restarts finds what it began and asks
  for it again by name (creation is idempotent by name).
- It moves to `spares` only once it has answered, so a claimed spare is a started one.
- A claimed spare is an ordinary dedicated actor: it ends after its idle lifetime and its
  user's record is released as any other. A spare that nobody lists any more (claimed,
  then restarted by Ray after a crash before its first delivery; or an orphan) ends the
  same way (consume/hosts.py `_listed_in_pool`).
- A start that fails or does not answer within `start_timeout_s` is dropped (and killed),
  and a new one takes its place on a later tick.

`PoolKeeper` is the loop's logic against two seams (`PoolStore`, `Starter`), so its
decisions are tested without Ray; `RedisPoolStore` and `RayStarter` are the real ones.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis

from qywx_ray.consume.placement import pool_spares_key, pool_starting_key
from qywx_ray.consume.tracker import DEDICATED_PREFIX
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, gauge

log = get_logger(__name__)

m_spares = gauge("qywx_dedicated_pool_spares", "Started spare dedicated actors nobody claimed")
m_starts = counter(
    "qywx_dedicated_pool_starts_total", "Spare dedicated actor starts, by outcome", ["outcome"]
)

POOL_MARK = "~pool:"


def spare_name(name_prefix: str) -> str:
    return f"{DEDICATED_PREFIX}{POOL_MARK}{name_prefix}:{uuid.uuid4().hex[:12]}"


def is_spare_name(key: str) -> bool:
    return key.startswith(DEDICATED_PREFIX + POOL_MARK)


def starts_due(size: int, spares: int, starting: int, at_once: int) -> int:
    """New spares to start now: up to the pool size, with at most `at_once` starting
    (more at once only makes every start slower on a small node)."""
    return max(0, min(size - spares - starting, at_once - starting))


class PoolStore(Protocol):
    def read(self) -> tuple[set[str], set[str]]:
        """(spares, starting)."""
        ...

    def intend(self, names: Iterable[str]) -> None:
        """Record names about to be started (before they are)."""
        ...

    def ready(self, name: str) -> bool:
        """A started one becomes a spare; False if it was not starting."""
        ...

    def drop(self, names: Iterable[str]) -> None:
        """Forget names (failed or timed-out starts, vanished spares)."""
        ...


class Starter(Protocol):
    def start(self, name: str) -> Any:
        """Create (or find) the named spare and ask it to answer; returns a token."""
        ...

    def answered(self, tokens: list[Any]) -> dict[Any, bool]:
        """Tokens that have an answer: True = it answered, False = it failed."""
        ...

    def kill(self, name: str) -> None: ...


class PoolKeeper:
    """One `tick()` per interval: collect answers, then start what is due."""

    def __init__(
        self,
        store: PoolStore,
        starter: Starter,
        *,
        name_prefix: str,
        size: int,
        at_once: int,
        start_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.starter = starter
        self.name_prefix = name_prefix
        self.size = size
        self.at_once = at_once
        self.start_timeout_s = start_timeout_s
        self.clock = clock
        self._waiting: dict[Any, tuple[str, float]] = {}  # token -> (name, asked at)
        self._adopted = False
        self.stats = {"spares": 0, "starting": 0, "started": 0, "failed": 0, "timed_out": 0}

    def tick(self) -> None:
        spares, starting = self.store.read()
        asked = {name for name, _ in self._waiting.values()}
        # A start nobody waits for (an earlier keeper's, or one whose answer a Redis
        # error lost) is asked for again by name: one that exists just answers. After a
        # keeper (re)start the listed spares too, as a pipeline stop may have killed them.
        again = starting if self._adopted else spares | starting
        for name in sorted(again - asked):
            self._ask(name)
        self._adopted = True
        self._collect(spares, starting)
        names = [
            spare_name(self.name_prefix)
            for _ in range(starts_due(self.size, len(spares), len(starting), self.at_once))
        ]
        if names:
            self.store.intend(names)
            starting.update(names)
            for name in names:
                self._ask(name)
        self.stats.update(spares=len(spares), starting=len(starting))
        m_spares.set(len(spares))

    def _ask(self, name: str) -> None:
        self._waiting[self.starter.start(name)] = (name, self.clock())

    def _collect(self, spares: set[str], starting: set[str]) -> None:
        """Answers move starting -> spares; failed starts are dropped, and so are starts
        that did not answer in time (killed: a spare listed already is left alone, it
        may have been claimed meanwhile). A store error leaves the rest for next tick."""
        answers = self.starter.answered(list(self._waiting)) if self._waiting else {}
        now = self.clock()
        for token, (name, asked_at) in list(self._waiting.items()):
            ok = answers.get(token)
            if ok is None and now - asked_at < self.start_timeout_s:
                continue
            if ok:
                if name in starting and self.store.ready(name):
                    starting.discard(name)
                    spares.add(name)
                    self.stats["started"] += 1
                    m_starts.inc(outcome="started")
            elif ok is False or name in starting:
                outcome = "failed" if ok is False else "timed_out"
                if ok is None:
                    self.starter.kill(name)
                self.store.drop([name])
                spares.discard(name)
                starting.discard(name)
                self.stats[outcome] += 1
                m_starts.inc(outcome=outcome)
                log.warning("dedicated_pool.start_" + outcome, actor=name)
            del self._waiting[token]


class RedisPoolStore:
    """The pool's two sets, next to the placement records they are claimed from."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._spares = pool_spares_key(prefix)
        self._starting = pool_starting_key(prefix)

    def read(self) -> tuple[set[str], set[str]]:
        pipe = self._client.pipeline(transaction=False)
        pipe.smembers(self._spares)
        pipe.smembers(self._starting)
        spares, starting = pipe.execute()
        return _texts(spares), _texts(starting)

    def intend(self, names: Iterable[str]) -> None:
        self._client.sadd(self._starting, *names)

    def ready(self, name: str) -> bool:
        return bool(self._client.smove(self._starting, self._spares, name))

    def drop(self, names: Iterable[str]) -> None:
        names = list(names)
        pipe = self._client.pipeline(transaction=False)
        pipe.srem(self._spares, *names)
        pipe.srem(self._starting, *names)
        pipe.execute()


def _texts(values: Iterable[Any]) -> set[str]:
    return {v.decode() if isinstance(v, bytes) else str(v) for v in values}


class RayStarter:
    """Spares are real `DedicatedUserActor`s, created by name with `pooled=True`."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def start(self, name: str) -> Any:
        from qywx_ray.consume.hosts import get_or_create_user_actor

        return get_or_create_user_actor(self.settings, name, pooled=True).incarnation_id.remote()

    def answered(self, tokens: list[Any]) -> dict[Any, bool]:
        import ray
        from ray.exceptions import RayError

        ready, _ = ray.wait(tokens, num_returns=len(tokens), timeout=0)
        out: dict[Any, bool] = {}
        for ref in ready:
            try:
                ray.get(ref, timeout=0)
                out[ref] = True
            except RayError:
                out[ref] = False
        return out

    def kill(self, name: str) -> None:
        import ray

        with contextlib.suppress(ValueError):  # never registered, or gone meanwhile
            ray.kill(
                ray.get_actor(name, namespace=self.settings.consume.namespace), no_restart=True
            )

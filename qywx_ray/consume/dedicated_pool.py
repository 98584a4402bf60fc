"""Dedicated mode's warm pool: spare user actors started before any user needs one.

A dedicated user's actor is a Ray worker process. Started on demand, a new user's first
message waits for that process (on 2 cores Ray starts 1-2 actors a second; a burst of 50
new users waited 13-15 s at p50, docs/benchmarks.md). With `consume.dedicated_pool_size`
> 0, consumer 0 keeps that many spares started, and the placement script
(consume/placement.py) hands a new dedicated user a spare in the same step that decides
its placement (SPOP): the user's record names the spare, and its first message waits for
a Ray call. With no spare left the user gets an actor named after it, started on demand.

Who owns what:
- A spare is named before it starts (`user:~pool:{name_prefix}:{hex}`) and its name goes
  into the `starting` set first, so a keeper that restarts finds what it began and asks
  for it again by name (creation is idempotent by name).
- It moves to `spares` only once it has answered. A keeper that (re)starts first takes
  off the list every listed spare whose actor is gone (stopping a pipeline kills every
  user actor but leaves the lists), and those beyond a smaller size (killed).
- A claimed spare is an ordinary dedicated actor: it ends after its idle lifetime and its
  user's record is released as any other. A spare that finds itself listed nowhere
  (claimed; or restarted by Ray after a crash before its first delivery; or an orphan)
  starts its idle lifetime from then, so a claimed one lives at least one lifetime
  (consume/hosts.py, `still_listed` here).
- A start that fails or does not answer within `start_timeout_s` is taken off the list
  and killed, and a new one takes its place on a later tick.

What can outlive its use: a listed spare lives until it is claimed, or until a keeper of
the same pipeline (same `name_prefix`) retires it; a pipeline stopped for good with
`qywx-ray stop` (or `stop_consumers(kill_hosts=True)`) kills its spares, but its two sets
stay in Redis (a few names). If the sets are lost (Redis flushed, a failover without
persistence) the live spares are listed nowhere and end one idle lifetime later, while
the keeper starts a new pool: up to twice the pool for that long.

`PoolKeeper` is the loop's logic against two seams (`PoolStore`, `Starter`), so its
decisions are tested without Ray; `RedisPoolStore` and `RayStarter` are the real ones.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis
from redis.exceptions import RedisError

from qywx_ray.consume.placement import pool_spares_key, pool_starting_key
from qywx_ray.consume.tracker import DEDICATED_PREFIX
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, gauge

log = get_logger(__name__)

m_spares = gauge(
    "qywx_dedicated_pool_spares", "Spare dedicated actors listed as started and not claimed"
)
m_starts = counter(
    "qywx_dedicated_pool_starts_total", "Spare dedicated actor starts, by outcome", ["outcome"]
)

POOL_MARK = "~pool:"


def spare_name(name_prefix: str) -> str:
    return f"{DEDICATED_PREFIX}{POOL_MARK}{name_prefix}:{uuid.uuid4().hex[:12]}"


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

    def retire(self, name: str) -> bool:
        """Take a name off both lists; True if it was listed (so nobody claimed it)."""
        ...


class Starter(Protocol):
    def start(self, name: str) -> Any:
        """Create (or find) the named spare and ask it to answer; returns a token."""
        ...

    def answered(self, tokens: list[Any]) -> dict[Any, bool]:
        """Tokens that have an answer: True = it answered, False = it failed."""
        ...

    def exists(self, name: str) -> bool:
        """An actor of that name is registered (when unsure: True)."""
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
        self._checked = False
        self._born = clock()
        self.stats = dict.fromkeys(
            ("spares", "starting", "started", "failed", "timed_out", "retired"), 0
        )
        self.filled_after_s: float | None = None  # from this keeper's start to a full pool

    def report(self) -> dict[str, Any]:
        """What consumer 0's snapshot shows of the pool."""
        return {**self.stats, "filled_after_s": self.filled_after_s}

    def tick(self) -> None:
        spares, starting = self.store.read()
        if not self._checked:
            # After a keeper (re)start: a listed spare whose actor is gone (stopping a
            # pipeline kills every user actor) is taken off the list first.
            for name in sorted(n for n in spares if not self.starter.exists(n)):
                self._retire(name, spares, starting, kill=False)
            self._checked = True
        # A start nobody waits for (an earlier keeper's, or one whose answer a Redis
        # error lost) is asked for again by name: one that exists just answers.
        asked = {name for name, _ in self._waiting.values()}
        for name in sorted(starting - asked):
            self._ask(name)
        self._collect(spares, starting)
        # Spares beyond the size (a restart with a smaller pool, and the starts it had
        # begun): retired, and killed only if still listed (not claimed meanwhile).
        for name in sorted(spares)[: max(0, len(spares) - self.size)]:
            self._retire(name, spares, starting, kill=True)
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
        if self.filled_after_s is None and len(spares) >= self.size:
            self.filled_after_s = round(self.clock() - self._born, 3)
        m_spares.set(len(spares))

    def _ask(self, name: str) -> None:
        self._waiting[self.starter.start(name)] = (name, self.clock())

    def _retire(self, name: str, spares: set[str], starting: set[str], *, kill: bool) -> None:
        listed = self.store.retire(name)
        spares.discard(name)
        starting.discard(name)
        if listed and kill:
            self.starter.kill(name)
        self.stats["retired"] += 1

    def _collect(self, spares: set[str], starting: set[str]) -> None:
        """Answers move starting -> spares. A failed start, and a start that did not
        answer in time, is retired and killed (Ray would restart a crashed one, unlisted);
        a listed spare that does not answer in time is left alone: it may have been
        claimed meanwhile. A store error leaves the rest for the next tick."""
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
                self._retire(name, spares, starting, kill=True)
                self.stats[outcome] += 1
                m_starts.inc(outcome=outcome)
                log.warning("dedicated_pool.start_" + outcome, actor=name)
            del self._waiting[token]


def run_keeper(keeper: PoolKeeper, stop: threading.Event, interval_s: float = 0.5) -> None:
    """The keeper's loop: survives any error (Redis down, a GCS hiccup) and tries again
    next interval; ends when `stop` is set."""
    while not stop.wait(interval_s):
        try:
            keeper.tick()
        except Exception:
            log.warning("dedicated_pool.tick_failed", exc_info=True)


async def still_listed(client: Any, prefix: str, name: str) -> bool:
    """Is `name` still a spare or starting? (An async Redis client; a spare asks this
    about itself.) Redis down: True, it stays a spare until Redis answers."""
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.sismember(pool_spares_key(prefix), name)
            pipe.sismember(pool_starting_key(prefix), name)
            listed = await pipe.execute()
    except RedisError as exc:
        log.warning("user_actor.pool_check_failed", actor=name, error=str(exc))
        return True
    return any(listed)


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

    def retire(self, name: str) -> bool:
        pipe = self._client.pipeline(transaction=False)
        pipe.srem(self._spares, name)
        pipe.srem(self._starting, name)
        return bool(sum(pipe.execute()) > 0)


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

    def exists(self, name: str) -> bool:
        from qywx_ray.consume.hosts import actor_exists

        return actor_exists(name, self.settings.consume.namespace)

    def kill(self, name: str) -> None:
        import ray

        with contextlib.suppress(ValueError):  # never registered, or gone meanwhile
            ray.kill(
                ray.get_actor(name, namespace=self.settings.consume.namespace), no_restart=True
            )

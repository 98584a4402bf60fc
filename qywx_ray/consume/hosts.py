"""Thin Ray shells around HostCore: shared host actors and dedicated per-user actors.

Both are SYNCHRONOUS actors with max_concurrency=1 (Ray keeps one caller's call order
only for those) that run an asyncio loop on their own thread; `deliver` only checks the
incarnation and hands the batch to the loop, so one Ray call carries many messages.
Every instance has an incarnation id: a batch addressed to another incarnation is
rejected so the consumer re-sends everything in flight, in order. A dedicated actor ends
itself after its idle lifetime, but only when it holds nothing: no queued, running or
undurable message and no unreported completion; a warm-pool spare (dedicated_pool.py) only
once the pool no longer lists it. Never holds per-user order in Ray.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import ray

from qywx_ray.consume.batch_reads import make_batch_reads
from qywx_ray.consume.dedicated_pool import still_listed
from qywx_ray.consume.dedup import Deduplicator, RedisDoneStore
from qywx_ray.consume.handler_threads import HandlerThreads
from qywx_ray.consume.handlers import load_handler
from qywx_ray.consume.placement import placement_prefix
from qywx_ray.consume.sinks import make_admission, make_dead_letter_sink, make_retry_order
from qywx_ray.consume.state import RedisStateStore
from qywx_ray.consume.tracker import DEDICATED_PREFIX
from qywx_ray.consume.types import PackedDeliveries, pack_done, unpack_deliveries
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.dlq.tokens import make_drain_tokens
from qywx_ray.errors import QywxError
from qywx_ray.obs.logging import configure_logging, get_logger
from qywx_ray.placement import actor_options, where
from qywx_ray.process_tuning import gc_pauses, tune_gc
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis

log = get_logger(__name__)


class IncarnationMismatch(QywxError):
    """The batch was addressed to an earlier (or later) instance of this actor."""


class UserActorDying(QywxError):
    """A dedicated user actor is ending itself; fetch it again and re-send."""


def host_name(settings: Settings, index: int) -> str:
    return f"{settings.consume.name_prefix}-user-host-{index}"


def consumer_name(settings: Settings, index: int) -> str:
    return f"{settings.consume.name_prefix}-consumer-{index}"


def user_actor_name(open_kfid: str, external_userid: str) -> str:
    return f"{DEDICATED_PREFIX}{open_kfid}:{external_userid}"


def host_index(user: str, num_hosts: int) -> int:
    """Stable across processes and restarts (unlike Python's salted hash())."""
    return zlib.crc32(user.encode()) % num_hosts


class RayCompletionSink:
    """Sends completion batches to consumer actors by name (fire and forget)."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._handles: dict[str, Any] = {}
        self.last_refs: list[Any] = []

    def complete(self, consumer: str, done: Sequence[tuple[str, int, int]]) -> None:
        """`consumer` = "name#instance" (Delivery.consumer): a consumer re-created under
        the same name is a new key, so its handle is looked up again by name."""
        handle = self._handles.get(consumer)
        if handle is None:
            name = consumer.split("#", 1)[0]
            handle = ray.get_actor(name, namespace=self._namespace)
            if len(self._handles) >= 64:  # forget replaced instances
                self._handles.pop(next(iter(self._handles)))
            self._handles[consumer] = handle
        try:
            ref = handle.complete.options(enable_task_events=False).remote(pack_done(done))
        except Exception:
            self._handles.pop(consumer, None)
            raise
        self.last_refs = [*self.last_refs[-15:], ref]


class HostShell:
    """The plain object inside both actor kinds: a loop thread running a HostCore."""

    def __init__(
        self, settings: Settings, name: str, dedicated: bool = False, pooled: bool = False
    ) -> None:
        configure_logging(settings.obs.log_level, settings.obs.log_format)
        self.settings = settings
        self.name = name
        self.dedicated = dedicated
        # A warm-pool spare (consume/dedicated_pool.py) waits, however long, for the user
        # that claims it: before its first delivery it ends itself only once the pool
        # no longer lists it (`_still_a_spare`).
        self.pooled = pooled
        self._pool_checks = 0
        self.incarnation = uuid.uuid4().hex
        self.dying = False
        self._lock = threading.Lock()
        self._accepted = 0
        self._taken = 0
        self._last_take_s = time.monotonic()  # a new actor lives at least one idle lifetime
        self.completions = RayCompletionSink(settings.consume.namespace)
        # Sync handlers' own bounded pool; when timed-out handlers hold all of its threads
        # this host can no longer run them, so it crashes and Ray restarts it.
        self.handler_threads = HandlerThreads(
            settings.consume.handler_threads, name=name, on_exhausted=self._threads_exhausted
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="host-loop", daemon=True)
        self._thread.start()
        self.core: HostCore = self._call(self._build())
        asyncio.run_coroutine_threadsafe(self._sweeper(), self.loop)
        tune_gc()

    def _call(self, coro: Any, timeout_s: float = 30.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout_s)

    async def _build(self) -> HostCore:
        s = self.settings
        c = s.consume
        redis = make_async_redis(s.redis)
        dedup = Deduplicator(
            RedisDoneStore(redis, c.dedup_ttl_s, c.state_ttl_s),
            policy=c.redis_down_policy,
            recent_size=c.dedup_recent_size,
            retry_max_s=c.redis_retry_max_s,
        )
        handler_redis = make_async_redis(s.redis)  # handlers' own pool: dedup never waits
        wecom = None
        if c.reply_enabled:  # one WeCom client per host, its token shared through Redis
            from qywx_ray.wecom.client import RedisTokenCache, WeComClient

            wecom = WeComClient(s.wecom, RedisTokenCache(handler_redis))
        admission = make_admission(s)
        retry_order = make_retry_order(s)
        return HostCore(
            name=self.name,
            handler=self.handler_threads.wrap(load_handler(c.handler)),
            dedup=dedup,
            completions=self.completions,
            dead_letters=make_dead_letter_sink(s),
            admission=admission,
            batch_reads=make_batch_reads(redis, admission, retry_order),
            retry_order=retry_order,
            drain_tokens=make_drain_tokens(s),
            options=CoreOptions(
                mailbox_size=c.mailbox_size,
                idle_lifetime_s=c.idle_lifetime_s,
                handler_timeout_s=c.handler_timeout_s,
                handler_concurrency=c.handler_concurrency,
                completion_flush_ms=c.completion_flush_ms,
                handler_options=c.model_dump(),
                breaker=s.protect.breaker if s.protect.enabled else None,
                redis_down_policy=c.redis_down_policy,
                redis_retry_max_s=c.redis_retry_max_s,
                park_drain_chunk=c.park_drain_chunk,
                handler_infra_retry_s=c.handler_infra_retry_s,
                state_max_bytes=c.state_max_bytes,
            ),
            state_store=RedisStateStore(redis),  # loaded only for a `@stateful` handler
            redis=handler_redis,
            wecom=wecom,
            on_fatal=self._crash,
        )

    def _threads_exhausted(self, hung: int) -> None:
        """Every sync-handler thread is stuck in a handler past its timeout: the host
        still answers `incarnation_id`, so nothing would fail over; end it instead."""
        self._crash(f"{hung} handler threads hung past the handler timeout")

    def _crash(self, why: str) -> None:
        """Crash-only: an internal error must not leave messages stuck in a live actor.
        Ray restarts us with a new incarnation and the consumers re-send in order."""
        log.error("host.crash", host=self.name, why=why)
        os._exit(70)

    async def _sweeper(self) -> None:
        c = self.settings.consume
        interval = max(0.01, min(c.idle_sweep_interval_s, c.idle_lifetime_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.core.sweep()
                if self.dedicated:
                    if self.pooled and self._taken == 0 and self._idle_s() >= c.idle_lifetime_s:
                        self.pooled = await self._still_a_spare()
                    if self._maybe_die():
                        return
            except Exception:
                log.error("host.sweep_failed", exc_info=True, host=self.name)

    def _idle_s(self) -> float:
        return time.monotonic() - self._last_take_s

    async def _still_a_spare(self) -> bool:
        """A spare stays one while the pool lists it (spare or starting). Listed nowhere,
        it was claimed (or Ray restarted it after a crash before its first delivery, or
        it is an orphan): from then on it is an ordinary dedicated actor, and its idle
        lifetime starts now, so a spare claimed after a long wait is not ended before
        its user's first message reaches it."""
        prefix = placement_prefix(self.settings.consume.name_prefix)
        self._pool_checks += 1
        if await still_listed(self.core.redis, prefix, self.name):
            return True
        log.info("user_actor.spare_unlisted", actor=self.name)
        self._last_take_s = time.monotonic()
        return False

    def _maybe_die(self) -> bool:
        idle_s = self._idle_s()
        with self._lock:
            if (
                (self.pooled and self._taken == 0)
                or self._accepted != self._taken
                or idle_s < self.settings.consume.idle_lifetime_s
                or not self.core.idle()
            ):
                return False
            self.dying = True  # from now on deliver() and incarnation() refuse
        log.info("user_actor.exit", actor=self.name)
        refs = list(self.completions.last_refs)
        threading.Thread(target=self._exit, args=(refs,), daemon=True).start()
        return True

    def _exit(self, refs: list[Any]) -> None:
        if refs:  # make sure our last completions left this process before it ends
            ray.wait(refs, num_returns=len(refs), timeout=5.0)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _take(self, packed: PackedDeliveries) -> None:
        self._taken += 1
        self._last_take_s = time.monotonic()
        self.core.accept(unpack_deliveries(packed))

    # ---------------------------------------------------------------- actor API

    def deliver(self, batch: PackedDeliveries, expected_incarnation: str | None) -> str:
        """`batch` = consume.types.pack_deliveries(list of Delivery)."""
        if expected_incarnation != self.incarnation:
            raise IncarnationMismatch(f"{self.name}: now {self.incarnation}")
        with self._lock:
            if self.dying:
                raise UserActorDying(self.name)
            self._accepted += 1
            self.loop.call_soon_threadsafe(self._take, batch)
        return self.incarnation

    def incarnation_id(self) -> str:
        if self.dying:
            raise UserActorDying(self.name)
        return self.incarnation

    def user_count(self) -> int:
        """Mailboxes held now (a read of a dict's size: safe from the actor thread)."""
        return len(self.core.mailboxes)

    def snapshot(self) -> dict[str, Any]:
        async def snap() -> dict[str, Any]:
            return self.core.snapshot()

        out: dict[str, Any] = self._call(snap(), 10.0)
        out.update(
            mode="dedicated" if self.dedicated else "hosted",
            incarnation=self.incarnation,
            pid=os.getpid(),
            dying=self.dying,
            spare=self.pooled and self._taken == 0,
            # Times a spare, idle past its lifetime, asked whether the pool still lists it.
            pool_checks=self._pool_checks,
            handler_threads_hung=self.handler_threads.hung,
            node_id=ray.get_runtime_context().get_node_id(),
            gc=gc_pauses.stats(),
        )
        return out

    def latency_stats(self, reset: bool = False) -> dict[str, Any]:
        async def stats() -> dict[str, Any]:
            return self.core.latency_stats(reset)

        return self._call(stats(), 10.0)  # type: ignore[no-any-return]

    def latency_samples(self, reset: bool = False) -> list[int]:
        """Raw Kafka-timestamp -> handler-start samples (ms), for merging across hosts."""

        async def samples() -> list[int]:
            return self.core.report.take_latencies(reset)

        return self._call(samples(), 10.0)  # type: ignore[no-any-return]

    def pid(self) -> int:
        return os.getpid()


class _ShellActor:
    """What both actor kinds answer: each method forwards to the HostShell inside.

    A plain base class (Ray actor classes inherit its methods), so the two kinds differ
    only in how they build their shell and how they name themselves.
    """

    shell: HostShell

    def deliver(self, batch: PackedDeliveries, expected_incarnation: str | None) -> str:
        return self.shell.deliver(batch, expected_incarnation)

    def incarnation_id(self) -> str:
        return self.shell.incarnation_id()

    def snapshot(self) -> dict[str, Any]:
        return self.shell.snapshot()

    def latency_stats(self, reset: bool = False) -> dict[str, Any]:
        return self.shell.latency_stats(reset)

    def latency_samples(self, reset: bool = False) -> list[int]:
        return self.shell.latency_samples(reset)

    def pid(self) -> int:
        return self.shell.pid()

    def where(self) -> dict[str, Any]:
        return where()


@ray.remote(num_cpus=0, max_restarts=-1)
class UserHost(_ShellActor):
    """A shared host of many user mailboxes (mode `hosted`)."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.shell = HostShell(settings, name)

    def __repr__(self) -> str:
        # Ray shows this in the dashboard and log prefixes (taken once, after __init__).
        return f"UserHost({self.shell.name} users={self.shell.user_count()})"


@ray.remote(num_cpus=0, max_restarts=-1)
class DedicatedUserActor(_ShellActor):
    """One user's own actor (mode `dedicated`); ends itself when idle and empty. A
    `pooled` one is a warm-pool spare, named before any user claimed it."""

    def __init__(self, settings: Settings, name: str, pooled: bool = False) -> None:
        self.shell = HostShell(settings, name, dedicated=True, pooled=pooled)

    def __repr__(self) -> str:
        return f"DedicatedUserActor({self.shell.name})"


def start_hosts(settings: Settings) -> list[Any]:
    """Create (or find) the named detached host actors and wait until they answer."""
    c = settings.consume
    handles = [
        UserHost.options(  # type: ignore[attr-defined]
            name=host_name(settings, i),
            namespace=c.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_concurrency=1,  # sync + 1: Ray keeps our call order
            **actor_options(settings.placement, "user_host"),
        ).remote(settings, host_name(settings, i))
        for i in range(c.num_hosts)
    ]
    ray.get([h.incarnation_id.remote() for h in handles], timeout=120)
    return handles


def get_or_create_user_actor(settings: Settings, name: str, pooled: bool = False) -> Any:
    """The named actor, created if it does not exist. Consumers create the actor of the
    user they are about to send to (`pooled=False`: it ends after its idle lifetime even
    if the message went elsewhere); only the pool keeper creates spares."""
    return DedicatedUserActor.options(  # type: ignore[attr-defined]
        name=name,
        namespace=settings.consume.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_concurrency=1,
        **actor_options(settings.placement, "dedicated_user"),
    ).remote(settings, name, pooled)


def actor_exists(name: str, namespace: str) -> bool:
    """A named actor is registered (alive or restarting). A GCS hiccup answers True:
    callers use False to hand something back, so when unsure they keep it and ask again."""
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    except Exception:  # noqa: BLE001 - GCS hiccup: assume alive, ask again next time
        return True
    return True

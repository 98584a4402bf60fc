"""Hosts the KfSyncers of many open_kfids in one process, plus the spool replayer.

A fixed set of named detached host actors (`qywx-syncer-host-{i}`); an open_kfid always
maps to the same host by a stable hash, so exactly one syncer per open_kfid exists in
the Ray cluster, and the Redis lock + fenced cursor keep it exactly one even across
clusters or while a host restarts. Known open_kfids are remembered in Redis so a
restarted host resumes their periodic sweeps (lost callbacks) without a new callback.
Must never: pull for an open_kfid that hashes to another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import zlib
from typing import Any

from qywx_ray.cancel import cancel_until_done
from qywx_ray.ingest.factory import IngestParts, build_ingest
from qywx_ray.ingest.syncer import KfSyncer
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger
from qywx_ray.placement import actor_options
from qywx_ray.process_tuning import tune_gc
from qywx_ray.settings import Settings
from qywx_ray.wecom.client import RedisTokenCache, WeComClient

log = get_logger(__name__)

MISROUTED = metrics.counter(
    "qywx_pull_requests_misrouted_total",
    "Pull requests a syncer host refused: the open_kfid hashes to another host",
)


def known_kfids_key(key_prefix: str) -> str:
    """Redis set of every open_kfid seen, so restarted hosts resume their sweeps."""
    return f"{key_prefix}:ingest:kfids"


def syncer_host_index(open_kfid: str, num_hosts: int) -> int:
    return zlib.crc32(open_kfid.encode()) % num_hosts


def split_by_owner(
    items: list[tuple[str, str]], index: int, num_hosts: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(items host `index` owns, items that belong to another host), order kept."""
    mine: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    for item in items:
        (mine if syncer_host_index(item[0], num_hosts) == index else others).append(item)
    return mine, others


def syncer_host_name(index: int) -> str:
    return f"qywx-syncer-host-{index}"


class SyncerHostService:
    """Plain asyncio object: one IngestParts, one WeCom client, many syncers."""

    def __init__(self, settings: Settings, index: int, num_hosts: int) -> None:
        self.settings = settings
        self.index = index
        self.num_hosts = num_hosts
        self.kfids_key = known_kfids_key(settings.ingest.key_prefix)
        self.parts: IngestParts = build_ingest(settings)
        self.wecom = WeComClient(settings.wecom, RedisTokenCache(self.parts.redis))
        self.syncers: dict[str, KfSyncer] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._replayer_task: asyncio.Task[None] | None = None
        self._stop_replay = asyncio.Event()
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._replayer_task = asyncio.create_task(self._replay_loop())
        with contextlib.suppress(Exception):  # Redis down: callbacks will bring them back
            for raw in await self.parts.redis.smembers(self.kfids_key):
                kfid = raw.decode() if isinstance(raw, bytes) else str(raw)
                if syncer_host_index(kfid, self.num_hosts) == self.index:
                    self._ensure(kfid)
        for kfid in self.settings.ingest.open_kfids:
            if syncer_host_index(kfid, self.num_hosts) == self.index:
                self._ensure(kfid)

    def _ensure(self, open_kfid: str) -> KfSyncer:
        syncer = self.syncers.get(open_kfid)
        if syncer is None:
            syncer = self.parts.syncer(open_kfid, self.wecom)
            self.syncers[open_kfid] = syncer
            self.tasks[open_kfid] = asyncio.create_task(syncer.run())
            log.info("syncer.started", open_kfid=open_kfid, host=self.index)
        return syncer

    async def request_pulls(self, items: list[tuple[str, str]]) -> int:
        """(open_kfid, callback token) pairs, already coalesced by the dispatcher; returns
        how many this host took. An open_kfid that hashes to another host (the dispatcher
        and this host disagree on the host count, e.g. mid-deploy) is not pulled here -
        two hosts would race for its lock and sweep it twice - but is remembered in the
        known set, so its owner sweeps it from its next start; counted and logged."""
        await self.start()
        mine, misrouted = split_by_owner(items, self.index, self.num_hosts)
        new = []
        for open_kfid, token in mine:
            if open_kfid not in self.syncers:
                new.append(open_kfid)
            self._ensure(open_kfid).request_pull(token or None)
        if misrouted:
            MISROUTED.inc(len(misrouted))
            log.warning(
                "syncer_host.misrouted_pull_requests",
                host=self.index,
                num_hosts=self.num_hosts,
                open_kfids=[k for k, _ in misrouted][:20],
            )
        remember = new + [k for k, _ in misrouted]
        if remember:
            with contextlib.suppress(Exception):
                await self.parts.redis.sadd(self.kfids_key, *remember)
        return len(mine)

    async def _replay_loop(self) -> None:
        """The replayer's own loop (SpoolReplayer.run: nothing but close() ends it)."""
        replayer = self.parts.replayer()
        await replayer.run(self.settings.ingest.spool_replay_interval_s, self._stop_replay)

    def stats(self) -> dict[str, Any]:
        return {
            "host": self.index,
            "pid": os.getpid(),
            "open_kfids": sorted(self.syncers),
            "pending_deliveries": len(self.parts.producer),
        }

    async def close(self, timeout_s: float = 10.0) -> int:
        """Graceful stop, bounded by ~2 x timeout_s: no new pulls; a pull in progress may
        finish within timeout_s, then it is cancelled (its cursor stays at the last page
        Kafka acked or the spool took, so nothing is skipped; the page is pulled again
        later). Locks are released as their pulls end, then the producer is flushed.
        Returns the messages the producer could not deliver in time (their cursor did
        not move: they are pulled again by the next owner)."""
        for syncer in self.syncers.values():
            syncer.stop()
        tasks = [*self.tasks.values()]
        self._stop_replay.set()  # a replay in progress finishes (bounded below)
        if self._replayer_task:
            tasks.append(self._replayer_task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:  # run_locked releases the lock as the pull unwinds
                cancel_until_done(task)
            if pending:
                await asyncio.wait(pending, timeout=timeout_s)
                log.warning("syncer_host.pulls_cancelled", host=self.index, n=len(pending))
        await self.wecom.aclose()
        remaining = await self.parts.aclose(timeout_s)
        log.info("syncer_host.closed", host=self.index, undelivered=remaining)
        return remaining


class SyncerHost:
    """The Ray shell around SyncerHostService: one named detached actor per host index.

    One class for the process (Ray shows `SyncerHost` in the dashboard and `ray::SyncerHost`
    as the worker's title); `syncer_host_actor_class` makes it a Ray actor class once,
    and each host's name, namespace and placement are `.options()` of that one class.
    Plain here, so importing this module does not need Ray.
    """

    def __init__(self, settings: Settings, index: int, num_hosts: int) -> None:
        from qywx_ray.obs.logging import configure_logging

        configure_logging(settings.obs.log_level, settings.obs.log_format)
        self.service = SyncerHostService(settings, index, num_hosts)
        self._num_hosts = num_hosts
        tune_gc()

    def __repr__(self) -> str:
        # Ray shows this in the dashboard and log prefixes (taken once, after __init__).
        return f"SyncerHost({self.service.index + 1} of {self._num_hosts})"

    async def where(self) -> dict[str, Any]:
        from qywx_ray.placement import where

        return where()

    async def request_pulls(self, items: list[tuple[str, str]]) -> int:
        return await self.service.request_pulls(items)

    async def stats(self) -> dict[str, Any]:
        await self.service.start()
        return self.service.stats()

    async def metrics_snapshot(self) -> dict[str, float]:
        """This host's metric totals (e.g. qywx_degraded_messages_total), no scrape needed."""
        from qywx_ray.obs.metrics import snapshot

        return snapshot()

    async def shutdown(self, timeout_s: float = 10.0) -> int:
        """Graceful stop (see SyncerHostService.close); call before ray.kill."""
        return await self.service.close(timeout_s)


@functools.cache
def syncer_host_actor_class() -> Any:
    """SyncerHost as a Ray actor class, made once per process (a class per call would be
    a new actor class definition exported to the cluster each time)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(SyncerHost)


def get_syncer_host(settings: Settings, index: int) -> Any:
    """The named host actor, created on first use (detached: it outlives the caller)."""
    actor_cls = syncer_host_actor_class()
    return actor_cls.options(
        name=syncer_host_name(index),
        namespace=settings.ray_namespace,
        lifetime="detached",
        get_if_exists=True,
        **actor_options(settings.placement, "syncer_host"),
    ).remote(settings, index, settings.ingest.num_syncer_hosts)

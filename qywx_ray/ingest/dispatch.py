"""The callback sink: turns a burst of callbacks into a few pull requests, without blocking.

`submit` only records (open_kfid → newest token) in a dict and returns; a flush task
sends one batched Ray call per syncer host every `flush_interval_s`. So 2,000 callbacks
for one open_kfid in a second become a handful of pull requests, and the request path
never waits on Ray, Kafka or WeCom. A failed send is put back and retried; nothing is
lost even if it were: the syncer's periodic sweep pulls anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from qywx_ray.ingest.syncer_host import syncer_host_index
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter
from qywx_ray.wecom.models import KfCallbackEvent

log = get_logger(__name__)

PULL_REQUESTS = counter(
    "qywx_pull_requests_total", "Coalesced pull requests sent to syncer hosts", ["result"]
)

SendFn = Callable[[int, list[tuple[str, str]]], Awaitable[object]]


class PullDispatcher:
    def __init__(self, send: SendFn, num_hosts: int, flush_interval_s: float = 0.01) -> None:
        self._send = send
        self._num_hosts = num_hosts
        self._flush_interval_s = flush_interval_s
        self._pending: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self.submitted = 0
        self.sent = 0

    def submit(self, event: KfCallbackEvent) -> None:
        self.submitted += 1
        kfid = event.open_kfid
        if not kfid:
            return
        self._pending[kfid] = event.token or self._pending.get(kfid, "")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self._flush_interval_s)
        await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        by_host: dict[int, list[tuple[str, str]]] = {}
        for kfid, token in pending.items():
            by_host.setdefault(syncer_host_index(kfid, self._num_hosts), []).append((kfid, token))
        for host, items in by_host.items():
            try:
                await self._send(host, items)
                self.sent += 1
                PULL_REQUESTS.inc(result="sent")
            except Exception as exc:
                PULL_REQUESTS.inc(result="failed")
                log.warning("dispatch.send_failed", host=host, error=str(exc))
                for kfid, token in items:  # keep them for the next flush
                    self._pending.setdefault(kfid, token)
        if self._pending and (self._task is None or self._task.done() or True):
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(
                    1.0, lambda: asyncio.ensure_future(self.flush())
                )

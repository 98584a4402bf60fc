"""The callback sink: turns a burst of callbacks into a few pull requests, without blocking.

`submit` only records (open_kfid → newest token) in a dict and returns; one flusher task
gathers for `flush_interval_s`, then sends one batched Ray call per syncer host, and
under a burst at most one every `min_send_interval_s`. So 2,000 callbacks for one
open_kfid in a few seconds become ~10 pull requests a second (the syncer coalesces
again: requests during a running pull cause one more pull after it), and the
request path never waits on Ray, Kafka or WeCom. A failed send is kept and retried with
backoff. `sweep_soon` (called when callbacks are shed) asks for a pull of every open_kfid
this dispatcher has seen or was configured with, at most once per `sweep_delay_s`.
Must never: block or do I/O in `submit`, or forget a pending open_kfid after a failed send.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable

from qywx_ray.cancel import cancel_until_done
from qywx_ray.ingest.loops import loop_failed
from qywx_ray.ingress.syncer_host import syncer_host_index
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter
from qywx_ray.wecom.models import KfCallbackEvent

log = get_logger(__name__)

PULL_REQUESTS = counter(
    "qywx_pull_requests_total", "Coalesced pull requests sent to syncer hosts", ["result"]
)

SendFn = Callable[[int, list[tuple[str, str]]], Awaitable[object]]


class PullDispatcher:
    def __init__(
        self,
        send: SendFn,
        num_hosts: int,
        flush_interval_s: float = 0.01,
        *,
        min_send_interval_s: float = 0.1,
        known_kfids: Iterable[str] = (),
        sweep_delay_s: float = 1.0,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        send_timeout_s: float = 10.0,
    ) -> None:
        self._send = send
        self._num_hosts = num_hosts
        self._flush_interval_s = flush_interval_s
        self._min_send_interval_s = min_send_interval_s
        self._last_send_at = -1e9
        self._sweep_delay_s = sweep_delay_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._send_timeout_s = send_timeout_s
        self._pending: dict[str, str] = {}
        self._sweep_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.known: set[str] = set(known_kfids)
        self.submitted = 0
        self.sent = 0  # batched send calls that succeeded
        self.sweeps = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, event: KfCallbackEvent) -> None:
        self.submitted += 1
        kfid = event.open_kfid
        if not kfid:
            return
        self.known.add(kfid)
        # The newest token wins; an empty one never overwrites a token we already hold.
        self._pending[kfid] = event.token or self._pending.get(kfid, "")
        self._wake()

    def sweep_soon(self) -> None:
        """Pull every known open_kfid within sweep_delay_s (callbacks were shed); coalesced."""
        if self._sweep_at is None:
            self._sweep_at = asyncio.get_running_loop().time() + self._sweep_delay_s
            self._wake()

    def _wake(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Flush until nothing is pending or due; back off while sends fail."""
        loop = asyncio.get_running_loop()
        retry_s = self._retry_initial_s
        while self._pending or self._sweep_at is not None:
            sweep_at = self._sweep_at
            if self._pending or sweep_at is None:
                spacing_s = self._last_send_at + self._min_send_interval_s - loop.time()
                await asyncio.sleep(max(self._flush_interval_s, spacing_s))
            else:  # only a sweep is due: wait for it (callbacks arriving meanwhile join it)
                await asyncio.sleep(max(0.0, sweep_at - loop.time()))
            if self._sweep_at is not None and loop.time() >= self._sweep_at:
                self._sweep_at = None
                self.sweeps += 1
                for kfid in self.known:
                    self._pending.setdefault(kfid, "")
            self._last_send_at = loop.time()
            try:
                sent = await self.flush()
            except Exception as exc:  # noqa: BLE001 - flush keeps what it could not send; never end here
                loop_failed("pull_dispatch", exc)
                sent = False
            if sent:
                retry_s = self._retry_initial_s
            else:
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, self._retry_max_s)

    async def flush(self) -> bool:
        """Send what is pending, one call per host; False if any send failed (kept)."""
        if not self._pending:
            return True
        by_host: dict[int, list[tuple[str, str]]] = {}
        for kfid, token in self._pending.items():
            by_host.setdefault(syncer_host_index(kfid, self._num_hosts), []).append((kfid, token))
        self._pending = {}  # only now: a failure above leaves everything pending
        ok = True
        for host, items in by_host.items():
            try:
                # Bounded: a wedged host must not stall the pull requests of the others.
                async with asyncio.timeout(self._send_timeout_s):
                    await self._send(host, items)
                self.sent += 1
                PULL_REQUESTS.inc(result="sent")
            except Exception as exc:  # noqa: BLE001 - a failed pull request is counted and kept for the next flush
                ok = False
                PULL_REQUESTS.inc(result="failed")
                log.warning("dispatch.send_failed", host=host, error=str(exc)[:200])
                for kfid, token in items:  # keep them (a newer token may have arrived)
                    if not self._pending.get(kfid):
                        self._pending[kfid] = token
        return ok

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            cancel_until_done(self._task)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

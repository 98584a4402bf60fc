"""The simulator's asyncio runtime: pushes callbacks like WeCom (3 tries, no 200 within the
timeout -> retry) and runs the scripted population."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any
from urllib.parse import urlencode

import httpx

from qywx_ray.cancel import cancel_until_done
from qywx_ray.process_tuning import freeze_heap
from qywx_ray.testing.wecomsim.population import Population, PopulationConfig
from qywx_ray.testing.wecomsim.state import WeComSimulatorState

# The simulator keeps every message it makes (a stress run: millions of objects), and the
# cyclic collector's full passes over them stopped this process, so callbacks, sync_msg
# answers and the population itself, for 0.4-0.8 s at a time in a stress run's 8,000
# msg/s step (bench_stress `gc_by_group`). The population loop freezes the heap
# (process_tuning.freeze_heap) every FREEZE_EVERY messages made, by any means; the
# messages are acyclic, freed by refcount when pruned, frozen or not.
FREEZE_EVERY = 50_000


class WeComSimulator:
    """Pushes callbacks like WeCom (3 tries, no 200 within timeout → retry) and runs the
    scripted population. Use `async with WeComSimulator(...)` or start()/stop()."""

    def __init__(
        self,
        state: WeComSimulatorState,
        *,
        callback_url: str | None = None,
        callback_transport: httpx.AsyncBaseTransport | None = None,
        callback_timeout_s: float = 5.0,
        callback_tries: int = 3,
        callback_workers: int = 4,
        population: PopulationConfig | None = None,
        tick_s: float = 0.2,
        hang_s: float = 30.0,
    ) -> None:
        self.state = state
        self.callback_url = callback_url
        self.callback_timeout_s = callback_timeout_s
        self.callback_tries = callback_tries
        self.hang_s = hang_s
        self.tick_s = tick_s
        self.population = Population(state, population) if population else None
        self._transport = callback_transport
        self._workers = callback_workers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._pending: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None
        self.callback_log: deque[dict[str, Any]] = deque(maxlen=1000)
        self.population_paused = False  # customers stop chatting (e.g. before an audit)
        self._frozen_at = 0  # messages made when the heap was last frozen (FREEZE_EVERY)
        state.listeners.append(self._on_new)

    def _on_new(self, open_kfid: str) -> None:
        if self.callback_url is None or open_kfid in self._pending:
            return  # coalesce: one pending callback per open_kfid is enough to trigger a pull
        self._pending.add(open_kfid)
        self.state.stats.callbacks_queued += 1
        self._queue.put_nowait(open_kfid)

    async def start(self) -> WeComSimulator:
        self._http = httpx.AsyncClient(transport=self._transport)
        for _ in range(self._workers):
            self._tasks.append(asyncio.create_task(self._push_loop()))
        if self.population is not None:
            self._tasks.append(asyncio.create_task(self._population_loop()))
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            cancel_until_done(task)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> WeComSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def idle(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued callback has been delivered or given up."""
        async with asyncio.timeout(timeout_s):
            await self._queue.join()

    async def _population_loop(self) -> None:
        assert self.population is not None
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            if not self.population_paused:
                self.population.tick(now - last)
            last = now
            self._freeze_if_due()

    def _freeze_if_due(self) -> bool:
        if self.state.stats.messages - self._frozen_at < FREEZE_EVERY:
            return False
        self._frozen_at = self.state.stats.messages
        freeze_heap()
        return True

    async def _push_loop(self) -> None:
        while True:
            open_kfid = await self._queue.get()
            self._pending.discard(open_kfid)
            try:
                await self.push_callback(open_kfid)
            except Exception as exc:  # noqa: BLE001 - never let one bad push kill the worker
                self.callback_log.append({"open_kfid": open_kfid, "error": type(exc).__name__})
            finally:
                self._queue.task_done()

    async def push_callback(self, open_kfid: str) -> bool:
        """Send one callback (honouring drop/duplicate/latency faults); True if acked."""
        faults = self.state.take_faults("callback")
        if any(f.kind == "drop" for f in faults):
            self.state.stats.callbacks_dropped += 1
            self.callback_log.append({"open_kfid": open_kfid, "dropped": True})
            return False
        for f in faults:
            if f.kind == "latency" and f.latency_s > 0:
                await asyncio.sleep(f.latency_s)
        params, body = self.state.build_callback(open_kfid)
        ok = await self._deliver(open_kfid, params, body)
        if any(f.kind == "duplicate" for f in faults):
            self.state.stats.callbacks_duplicated += 1
            await self._deliver(open_kfid, params, body)
        return ok

    async def _deliver(self, open_kfid: str, params: dict[str, str], body: bytes) -> bool:
        assert self._http is not None
        assert self.callback_url is not None
        url = f"{self.callback_url}?{urlencode(params)}"
        for attempt in range(1, self.callback_tries + 1):
            self.state.stats.callback_attempts += 1
            status: int | str
            try:
                resp = await self._http.post(
                    url,
                    content=body,
                    headers={"content-type": "text/xml"},
                    timeout=self.callback_timeout_s,
                )
                status = resp.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == 200:
                self.state.stats.callbacks_delivered += 1
                self.callback_log.append(
                    {"open_kfid": open_kfid, "attempts": attempt, "status": 200}
                )
                return True
        self.state.stats.callbacks_failed += 1
        self.callback_log.append(
            {"open_kfid": open_kfid, "attempts": self.callback_tries, "status": status}
        )
        return False

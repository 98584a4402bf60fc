"""The bounded thread pool synchronous handlers run in, and its hung-thread accounting.

Python cannot stop a thread: a sync handler that overran its timeout keeps its thread
until the function returns, whatever the host decided about the message. Run in the
loop's default executor, such threads used to pile up in the pool the dead-letter
producer also needs, so a few hung handlers stopped every dead-letter write while the
host still answered its health probe (nothing failed over). Here sync handlers get their
own pool, and a thread whose caller gave up is counted as hung until it returns. When
hung threads hold every thread of the pool the host can make no more progress on sync
handlers: `on_exhausted` is called (once per exhaustion) so the host shell can crash and
let Ray restart it with fresh threads (crash-only), with a metric and a log line saying why.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from qywx_ray.consume.handlers import Handler, HandlerContext
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import gauge

log = get_logger(__name__)

HUNG_THREADS = gauge(
    "qywx_handler_threads_hung",
    "Sync-handler threads still running after their caller gave up (handler timeout)",
    ["host"],
)


class HandlerThreads:
    """A bounded pool for sync handlers that knows which of its threads are hung.

    "Hung" = still running after the awaiting coroutine was cancelled; in a HostCore only
    the handler timeout (or shutdown) cancels a handler. A job cancelled while still
    queued never ran and is simply dropped. `on_exhausted(hung)` runs in the thread that
    noticed (the host's loop thread) and must not block.
    """

    def __init__(
        self,
        size: int,
        *,
        name: str = "",
        on_exhausted: Callable[[int], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"handler thread pool size must be >= 1, got {size}")
        self.size = size
        self.name = name
        self.on_exhausted = on_exhausted
        self._executor = ThreadPoolExecutor(
            max_workers=size, thread_name_prefix=f"handler-{name}" if name else "handler"
        )
        self._lock = threading.Lock()
        self._hung: set[Future[Any]] = set()
        self._reported = False  # on_exhausted already called for the current exhaustion
        HUNG_THREADS.set(0, host=name)

    @property
    def hung(self) -> int:
        with self._lock:
            return len(self._hung)

    @property
    def exhausted(self) -> bool:
        """Every thread is held by a handler nobody waits for any more."""
        return self.hung >= self.size

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on one of the pool's threads; cancelling the caller abandons it."""
        fut = self._executor.submit(fn, *args)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self._abandon(fut)
            raise

    def wrap(self, handler: Handler) -> Handler:
        """The handler to give a HostCore: async handlers unchanged, sync ones run here.
        The wrapper keeps the handler's attributes (e.g. the `@envelope_handler` mark)."""
        if inspect.iscoroutinefunction(handler):
            return handler

        @functools.wraps(handler)
        async def in_pool(message: Any, ctx: HandlerContext) -> Any:
            result = await self.run(handler, message, ctx)
            if inspect.isawaitable(result):
                result = await result
            return result

        return in_pool

    def shutdown(self, wait: bool = False) -> None:
        """Stop taking work; with `wait`, join the threads (hung ones only once released)."""
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _abandon(self, fut: Future[Any]) -> None:
        if fut.cancel():  # still queued: it never ran and never will
            return
        with self._lock:
            if fut.done():
                return
            self._hung.add(fut)
            hung = len(self._hung)
            newly_exhausted = hung >= self.size and not self._reported
            if newly_exhausted:
                self._reported = True
        fut.add_done_callback(self._released)  # runs at once if it finished meanwhile
        HUNG_THREADS.set(hung, host=self.name)
        log.error("handler.thread_hung", host=self.name, hung=hung, pool_size=self.size)
        if newly_exhausted:
            self._exhaust(hung)

    def _exhaust(self, hung: int) -> None:
        log.error(
            "handler.threads_exhausted",
            host=self.name,
            hung=hung,
            pool_size=self.size,
            action="host must restart" if self.on_exhausted is not None else "none",
        )
        if self.on_exhausted is None:
            return
        try:
            self.on_exhausted(hung)
        except Exception:  # the caller's CancelledError must still propagate
            log.error("handler.on_exhausted_failed", exc_info=True, host=self.name)

    def _released(self, fut: Future[Any]) -> None:
        """A hung handler returned at last (called from its worker thread)."""
        with self._lock:
            self._hung.discard(fut)
            hung = len(self._hung)
            if hung < self.size:
                self._reported = False
        HUNG_THREADS.set(hung, host=self.name)
        log.warning("handler.hung_thread_returned", host=self.name, hung=hung)


_fallback: HandlerThreads | None = None
_fallback_lock = threading.Lock()


def fallback_threads() -> HandlerThreads:
    """The pool `run_handler` uses for a sync handler nobody wrapped (e.g. a HostCore
    built without a host shell): bounded and never the loop's default executor, but with
    no host to end, so exhaustion is only logged and counted."""
    global _fallback
    with _fallback_lock:
        if _fallback is None:
            from qywx_ray.consume.settings import ConsumeSettings

            size = ConsumeSettings.model_fields["handler_threads"].default
            _fallback = HandlerThreads(size, name="unwrapped")
        return _fallback

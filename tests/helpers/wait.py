"""The one way tests poll: `wait_until` (sync) and its asyncio twin `wait_until_async`.

A poll is for waiting on another process, thread or task, never a fixed sleep, and always
bounded: on timeout it raises with what it was waiting for. The sync one is the devstack's
(`qywx_ray.devstack.procs.wait_until`, which the pipeline and the drills use), so there is
one implementation of each.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from qywx_ray.devstack.procs import wait_until
from qywx_ray.errors import InfraError

__all__ = ["wait_until", "wait_until_async"]


async def wait_until_async(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.01
) -> None:
    """Await until `predicate()` is true, yielding to the loop between checks; raises
    InfraError (as `wait_until` does) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise InfraError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)

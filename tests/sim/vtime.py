"""A virtual-time asyncio loop: no real IO, no real sleeping, reproducible schedules.

`VirtualTimeLoop.time()` is a number the loop owns. When nothing is ready, asyncio asks
its selector to wait `timeout` seconds for IO until the next timer; our selector instead
moves the virtual clock forward by exactly that timeout and reports no IO. So
`asyncio.sleep`, `call_later`, timeouts and anything reading `loop.time()` run in
virtual time, as fast as the CPU allows, in the same order for the same inputs.

Step hooks run after every loop iteration (one batch of ready callbacks): the
simulator checks its invariants there and may raise to stop the run at that step.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from typing import Any


class SimulationStalled(RuntimeError):
    """Nothing is ready and no timer is set: a real loop would block forever."""


class _VirtualSelector(selectors.SelectSelector):
    def __init__(self) -> None:
        super().__init__()
        self.advance: Callable[[float], None] = lambda _dt: None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationStalled("no ready callback and no timer: the loop would block")
        if timeout > 0:
            self.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start_s: float = 0.0) -> None:
        self._virtual_s = start_s
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.advance = self._advance
        self.step_hooks: list[Callable[[], None]] = []
        self.steps = 0

    def time(self) -> float:
        return self._virtual_s

    def _advance(self, dt: float) -> None:
        self._virtual_s += dt

    def _run_once(self) -> None:
        super()._run_once()  # type: ignore[misc]
        self.steps += 1
        for hook in self.step_hooks:
            hook()


def run_virtual(
    loop: VirtualTimeLoop, main: Any, on_stop: Callable[[], None] = lambda: None
) -> Any:
    """Run `main` to completion on `loop`, then cancel what is left and close the loop."""
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            loop.step_hooks.clear()
            on_stop()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                gathered = asyncio.gather(*pending, return_exceptions=True)
                for _ in range(10):  # a stale stop() from the interrupted run ends one early
                    try:
                        loop.run_until_complete(gathered)
                        break
                    except RuntimeError:
                        continue
        finally:
            asyncio.set_event_loop(None)
            loop.close()

"""The run's event trace: a bounded tail is printed with a failing seed."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class Trace:
    def __init__(self, clock: Callable[[], float], keep: int | None = 400) -> None:
        self.clock = clock
        self.events: deque[str] = deque(maxlen=keep)
        self.echo = False

    def add(self, event: str) -> None:
        line = f"{self.clock():9.3f}  {event}"
        self.events.append(line)
        if self.echo:
            print(line)

    def tail(self, n: int = 40) -> list[str]:
        return list(self.events)[-n:]

"""In-memory fakes for HostCore unit tests (no Ray, Kafka or Redis).

`make_core` / `make` build a HostCore wired to them; `MemoryRetryOrder` follows
dlq/parking.py's Lua semantics exactly (flag per user, list of parked values; integration
tests run the real scripts). Tests import from here, never from another test module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from qywx_ray.consume.dedup import Deduplicator, MemoryDoneStore
from qywx_ray.consume.handlers import HandlerContext, PermanentError
from qywx_ray.consume.mailbox import UserMailbox
from qywx_ray.consume.types import (
    ADMITTED,
    PARKED,
    WAITED_ON,
    DeadLetter,
    Delivery,
    HoldRequest,
    ParkRequest,
)
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from tests.helpers.wait import wait_until_async


class Completions:
    def __init__(self) -> None:
        self.done: list[tuple[str, int, int]] = []

    def complete(self, consumer: str, done: Sequence[tuple[str, int, int]]) -> None:
        self.done.extend(done)


class Letters:
    def __init__(self, fail_times: int = 0) -> None:
        self.letters: list[DeadLetter] = []
        self.fail_times = fail_times

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("DLQ down")
        self.letters.extend(letters)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def recording(message: Any, ctx: HandlerContext) -> None:
    opts = ctx.options
    gate: asyncio.Event | None = opts.get("gates", {}).get(ctx.message_id)
    opts["started"].append((ctx.user_id, ctx.message_id))
    if gate is not None:
        await gate.wait()
    fail = ctx.envelope.raw.get("fail")
    if fail == "permanent":
        raise PermanentError("no")
    if fail == "retryable":
        raise RuntimeError("downstream")
    if fail == "slow":
        await asyncio.sleep(1.0)
    opts["calls"].append((ctx.user_id, ctx.message_id))


def delivery(user: str, n: int, offset: int, partition: int = 0, **raw: Any) -> Delivery:
    env = Envelope(
        message_id=f"{user}-m{n}", open_kfid="kf1", external_userid=user, msgtype="text", raw=raw
    )
    return Delivery("t", partition, offset, int(time.time() * 1000), user, env.to_bytes(), "", "c0")


def make_core(
    *,
    store: MemoryDoneStore | None = None,
    letters: Letters | None = None,
    admission: Any = None,
    policy: str = "stop",
    clock: Clock | None = None,
    on_dying: Callable[[UserMailbox], Any] | None = None,
    **opts: Any,
) -> tuple[HostCore, Completions, dict[str, Any]]:
    handler_options: dict[str, Any] = {"calls": [], "started": [], "gates": {}}
    completions = Completions()
    core = HostCore(
        name="h0",
        handler=recording,
        dedup=Deduplicator(store or MemoryDoneStore(), policy=policy, retry_max_s=0.05),
        completions=completions,
        dead_letters=letters or Letters(),
        admission=admission,
        options=CoreOptions(completion_flush_ms=1.0, handler_options=handler_options, **opts),
        clock=clock or Clock(),
        on_dying=on_dying,
    )
    return core, completions, handler_options


async def until(pred: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll until `pred` holds; the bound is only a generous timeout (3 s failed a unit
    test at load ~20)."""
    await wait_until_async(pred, timeout_s=timeout_s, what="the condition", interval_s=0.005)


async def run_untimed_steps(passes: int = 200) -> None:
    """Let the loop run every step that needs no timer (the fakes here have none): what
    can happen without time passing has happened when this returns, on a slow machine
    as on a fast one. Loop passes, not a sleep."""
    for _ in range(passes):
        await asyncio.sleep(0)


class MemoryRetryOrder:
    def __init__(self, exempt: frozenset[str] = frozenset({"rate_limited", "user_blocked"})):
        self.flag: dict[str, str] = {}
        self.at: dict[str, tuple[int, int]] = {}  # a hold's blocker position
        self.lots: dict[str, list[bytes]] = {}
        self.exempt = exempt
        self.calls = 0

    def parks(self, reason: str) -> bool:
        return reason != "invalid_message" and reason not in self.exempt

    async def admit(self, items: Sequence[tuple[Any, ...]]) -> list[int]:
        self.calls += 1
        out = []
        for user, mid, value, is_retry, *position in items:
            waiting = self.flag.get(user)
            at = self.at.get(user)
            older = bool(position) and at is not None and position[0] == at[0]
            older = older and at is not None and 0 <= position[1] < at[1]
            if waiting == mid:
                out.append(WAITED_ON)
            elif waiting is not None and not is_retry and not older:
                self.lots.setdefault(user, []).append(value)
                out.append(PARKED)
            else:
                out.append(ADMITTED)
        return out

    async def park(self, request: ParkRequest) -> int:
        r = request
        current = self.flag.get(r.user)
        if current is not None and current != r.message_id and current not in r.replaces:
            return 2
        self.flag[r.user] = r.message_id
        self.at.pop(r.user, None)
        lot = self.lots.setdefault(r.user, [])[r.drop_first :]
        self.lots[r.user] = [*r.pending, *lot]
        return 1

    async def hold(self, request: HoldRequest) -> None:
        r = request
        if r.user not in self.flag:
            self.flag[r.user] = r.message_id
            self.at[r.user] = r.position
        self.lots.setdefault(r.user, []).extend(r.values)

    async def advance(
        self, user: str, mid: str, drop_n: int, max_n: int, op_id: str = ""
    ) -> tuple[int, list[bytes]]:
        if self.flag.get(user) != mid:
            return 0, []
        lot = self.lots.setdefault(user, [])
        del lot[:drop_n]
        if not lot:
            del self.flag[user]
            self.at.pop(user, None)
            return 2, []
        return 1, lot[:max_n]


class Limiter:
    """Admission that allows `allow` messages per user, then rate_limited; can be down."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.seen: dict[str, int] = {}
        self.down = False
        self.times: list[float] = []

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        raise AssertionError("the host must use admit_at")

    async def admit_at(
        self, requests: Sequence[tuple[str, Sequence[float]]]
    ) -> dict[str, list[str | None]]:
        if self.down:
            raise InfraError("redis down")
        out: dict[str, list[str | None]] = {}
        for user, times in requests:
            self.times.extend(times)
            for _ in times:
                n = self.seen[user] = self.seen.get(user, 0) + 1
                out.setdefault(user, []).append(None if n <= self.allow else "rate_limited")
        return out

    def on_success(self, user: str) -> None:
        return None

    def on_failure(self, user: str) -> None:
        return None


def make(
    order: MemoryRetryOrder | None = None,
    admission: Any = None,
    *,
    drain_tokens: Any = None,
    store: MemoryDoneStore | None = None,
    **opts: Any,
) -> tuple[HostCore, Completions, Letters, dict[str, Any]]:
    handler_options: dict[str, Any] = {"calls": [], "started": [], "gates": {}}
    completions, letters = Completions(), Letters()
    core = HostCore(
        name="h0",
        handler=recording,
        dedup=Deduplicator(store or MemoryDoneStore(), retry_max_s=0.05),
        completions=completions,
        dead_letters=letters,
        admission=admission,
        retry_order=order,
        drain_tokens=drain_tokens,
        options=CoreOptions(
            completion_flush_ms=1.0, handler_options=handler_options, redis_retry_max_s=0.05, **opts
        ),
    )
    return core, completions, letters, handler_options


def retry_of(user: str, n: int, retry_count: int = 1, **raw: Any) -> Delivery:
    """What the DLQ recovery re-produces: same message, new offset, retry headers."""
    again = delivery(user, n, 1000 + n, **raw)
    return again._replace(retry_count=retry_count, is_retry=True)

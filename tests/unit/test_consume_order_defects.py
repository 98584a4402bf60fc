"""A review's reproductions of consume order defects, one test each (in-memory fakes, no services).

Each of these failed on the code before the fix; the seeded simulator (tests/sim/)
checks the same invariants over many interleavings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from qywx_ray.consume.dedup import MemoryDoneStore
from qywx_ray.consume.handlers import HandlerContext
from qywx_ray.consume.types import Delivery, ParkRequest
from qywx_ray.errors import InfraError
from tests.helpers.host_fakes import (
    Letters,
    MemoryRetryOrder,
    delivery,
    make,
    retry_of,
    run_untimed_steps,
    until,
)


class Tokens:
    """DrainTokenSink fake: what the host asked to put on the main topic."""

    def __init__(self) -> None:
        self.tokens: list[tuple[str, str]] = []

    async def drain_token(self, user: str, message_id: str, open_kfid: str) -> None:
        self.tokens.append((user, message_id))


def token_of(user: str, n: int, offset: int) -> Delivery:
    """The record a drain token becomes when the partition consumer reads it back."""
    return retry_of(user, n)._replace(offset=offset, retry_count=0, is_drain=True)


def handled(opts: dict[str, Any], user: str = "A") -> list[str]:
    return [m for u, m in opts["calls"] if u == user]


async def feed_retries(core: Any, letters: Letters, seen: int) -> int:
    """Play the DLQ recovery: re-deliver every new retryable letter as a retry."""
    new = letters.letters[seen:]
    for i, letter in enumerate(new):
        if letter.retryable:
            n = int(letter.message_id.split("-m")[1])
            core.accept(
                [
                    retry_of(letter.user, n, retry_count=letter.attempt)._replace(
                        offset=5000 + seen + i
                    )
                ]
            )
    return len(letters.letters)


async def test_queue_full_keeps_order_of_older_queued_messages() -> None:
    """Defect 1: mailbox_size=3, m0..m4: the overflow used to be denied and its retry ran
    ahead of older queued messages ([m3, m0, m1, m2, m4])."""
    order = MemoryRetryOrder()
    core, _done, letters, opts = make(order, mailbox_size=3)
    opts["gates"]["A-m0"] = gate = asyncio.Event()
    core.accept([delivery("A", i, i) for i in range(5)])
    await until(lambda: len(opts["started"]) == 1)
    gate.set()
    seen = 0
    for _ in range(200):
        seen = await feed_retries(core, letters, seen)
        if len(handled(opts)) >= 5 and not order.flag:
            break
        await asyncio.sleep(0.01)
    assert handled(opts) == [f"A-m{i}" for i in range(5)]
    assert order.flag == {}
    assert order.lots.get("A", []) == []


async def test_park_on_failure_does_not_race_with_admit() -> None:
    """Defect 2: a message admitted while the park is in flight used to be moved to the
    lot only after messages admitted behind the flag: [m0, m1, m3, m2]."""

    class SlowPark(MemoryRetryOrder):
        def __init__(self) -> None:
            super().__init__()
            self.before = asyncio.Event()
            self.after = asyncio.Event()
            self.parking = False

        async def park(self, request: ParkRequest) -> int:
            self.parking = True
            await self.before.wait()
            status = await super().park(request)
            await self.after.wait()
            return status

    order = SlowPark()
    core, done, _letters, opts = make(order)
    core.accept([delivery("A", 0, 0, fail="retryable"), delivery("A", 1, 1)])
    await until(lambda: order.parking)
    core.accept([delivery("A", 2, 2)])  # arrives while the park is in flight
    await run_untimed_steps()  # its ingest gets as far as it can (admit or lane)
    order.before.set()
    await until(lambda: order.flag.get("A") == "A-m0")
    core.accept([delivery("A", 3, 3)])  # arrives after the flag is set
    await run_untimed_steps()
    order.after.set()
    await until(lambda: len(done.done) == 4)
    core.accept([retry_of("A", 0)])
    await until(lambda: len(handled(opts)) == 4)
    assert handled(opts) == ["A-m0", "A-m1", "A-m2", "A-m3"]


async def test_redis_blip_on_the_blockers_retry_does_not_park_the_user_forever() -> None:
    """Defect 4: policy process, the retry's admit fails once: it ran as ADMITTED, the flag
    stayed, later messages sat in a lot nobody drained (their offsets committed: lost)."""

    class Blip(MemoryRetryOrder):
        fail_admits = 0

        async def admit(self, items: Sequence[tuple[str, str, bytes, bool]]) -> list[int]:
            if self.fail_admits:
                self.fail_admits -= 1
                raise InfraError("blip")
            return await super().admit(items)

    order = Blip()
    core, done, _letters, opts = make(order, redis_down_policy="process")
    core.accept([delivery("A", 0, 0, fail="retryable"), delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    assert order.flag == {"A": "A-m0"}
    order.fail_admits = 1
    core.accept([retry_of("A", 0)])
    await until(lambda: len(handled(opts)) == 2)
    await until(lambda: order.flag == {})
    assert handled(opts) == ["A-m0", "A-m1"]


async def test_handler_raising_cancelled_error_is_a_retryable_failure() -> None:
    """Defect 5: CancelledError from inside a handler killed the worker silently and left
    the mailbox scheduled forever."""

    async def cancels(message: Any, ctx: HandlerContext) -> None:
        if ctx.message_id == "A-m0":
            raise asyncio.CancelledError()
        ctx.options["calls"].append((ctx.user_id, ctx.message_id))
        ctx.options["started"].append((ctx.user_id, ctx.message_id))

    fatal: list[str] = []
    core, done, letters, opts = make(None)
    core.handler = cancels
    core.on_fatal = fatal.append
    core.accept([delivery("A", 0, 0), delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    assert [(x.message_id, x.reason, x.retryable) for x in letters.letters] == [
        ("A-m0", "downstream_error", True)
    ]
    assert handled(opts) == ["A-m1"]
    assert fatal == []
    assert not core.mailboxes["A"].scheduled


async def test_drain_completes_the_retry_offset_before_the_lot_is_empty() -> None:
    """Defect 6: the retry's offset stayed open until the user's lot was empty; a user who
    kept talking pinned the partition's commit. Now a drain token takes over the hold
    and the retry completes while the drain goes on."""
    order = MemoryRetryOrder()
    tokens = Tokens()
    core, done, _letters, opts = make(order, drain_tokens=tokens, park_drain_chunk=1)
    core.accept([delivery("A", 0, 0, fail="retryable")] + [delivery("A", i, i) for i in (1, 2, 3)])
    await until(lambda: len(done.done) == 4)
    opts["gates"]["A-m2"] = gate = asyncio.Event()
    core.accept([retry_of("A", 0)])  # offset 1000
    await until(lambda: ("A", "A-m2") in opts["started"])
    assert ("t", 0, 1000) in done.done  # completed while the drain still runs
    assert tokens.tokens
    assert set(tokens.tokens) == {("A", "A-m0")}
    core.accept([token_of("A", 0, 2000)])  # the first token comes back: held, not run
    gate.set()
    await until(lambda: order.flag == {})
    await until(lambda: ("t", 0, 2000) in done.done)
    assert handled(opts) == ["A-m0", "A-m1", "A-m2", "A-m3"]


async def test_drain_token_after_a_crash_resumes_the_drain() -> None:
    """A host died mid-drain after the retry completed: the uncommitted token comes back
    to a fresh host, which drains the rest without running the blocker again."""
    order = MemoryRetryOrder()
    core, done, _letters, _opts = make(order, drain_tokens=Tokens())
    core.accept([delivery("A", 0, 0, fail="retryable"), delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    # a fresh host (the old one is gone) gets the token: A-m0 is done already
    core2, done2, _, opts2 = make(order, drain_tokens=Tokens())
    await core2.dedup.store.mark_done(["A-m0"])
    core2.accept([token_of("A", 0, 2000)])
    await until(lambda: order.flag == {})
    await until(lambda: ("t", 0, 2000) in done2.done)
    assert handled(opts2) == ["A-m1"]


async def test_release_token_for_a_reviewed_blocker_drains_without_running_it() -> None:
    """Defect 7 (host side): a blocker sent to manual review releases its user through a
    drain token the recovery actor produces: the host drains the lot in order, the
    reviewed message itself does not run, and nothing else touches the lot."""
    order = MemoryRetryOrder()
    core, done, _letters, opts = make(order, drain_tokens=Tokens())
    core.accept([delivery("A", 0, 0, fail="retryable")] + [delivery("A", i, i) for i in (1, 2)])
    await until(lambda: len(done.done) == 3)
    core.accept([token_of("A", 0, 3000)])
    await until(lambda: order.flag == {})
    await until(lambda: ("t", 0, 3000) in done.done)
    assert handled(opts) == ["A-m1", "A-m2"]


async def test_waited_on_message_failing_for_good_releases_the_user() -> None:
    """A retry that fails with a non-retryable reason is dead-lettered for review; the
    user behind it is released at once (in order) instead of waiting for the review."""
    order = MemoryRetryOrder()
    core, done, letters, opts = make(order)
    core.accept([delivery("A", 0, 0, fail="retryable"), delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    core.accept([retry_of("A", 0, fail="permanent")])
    await until(lambda: order.flag == {})
    await until(lambda: handled(opts) == ["A-m1"])
    assert [x.reason for x in letters.letters] == ["downstream_error", "invalid_message"]


async def test_circuit_open_is_decided_at_the_head_and_keeps_order() -> None:
    """Defect 1 (breaker): an open breaker used to deny a new message while older ones
    were queued; now the head of the mailbox is dead-lettered and parks the user."""
    from qywx_ray.protect.settings import BreakerSettings

    order = MemoryRetryOrder()
    breaker = BreakerSettings(failure_threshold=1, open_seconds=3600, success_threshold=1)
    core, _done, letters, opts = make(order, mailbox_size=2, breaker=breaker)
    opts["gates"]["A-m0"] = gate = asyncio.Event()
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(opts["started"]) == 1)
    core.accept([delivery("A", i, i) for i in (1, 2, 3)])  # m2, m3 overflow: breaker opens
    await until(lambda: order.flag.get("A") == "A-m1")  # held behind the queue's tail
    gate.set()
    await until(lambda: len(letters.letters) == 1)
    assert letters.letters[0].reason == "circuit_open"
    assert letters.letters[0].message_id == "A-m1"
    assert handled(opts) == ["A-m0"]
    mb = core.mailboxes["A"]
    assert mb.breaker is not None
    mb.breaker._opened_at = -1e12  # type: ignore[assignment]  # open period over
    core.accept([retry_of("A", 1)])
    await until(lambda: order.flag == {})
    await until(lambda: len(handled(opts)) == 4)
    assert handled(opts) == [f"A-m{i}" for i in range(4)]


async def test_park_rate_limited_parks_at_the_head_and_keeps_order() -> None:
    """Defect 10: `dlq.park_rate_limited=True` had no effect. A parking denial now waits
    for its turn at the head of the mailbox, then parks the user behind itself."""
    from tests.helpers.host_fakes import Limiter

    order = MemoryRetryOrder(exempt=frozenset())  # rate_limited parks
    core, done, letters, opts = make(order, admission=Limiter(allow=2))
    core.accept([delivery("A", i, i) for i in range(4)])
    await until(lambda: len(done.done) == 4)
    assert [(x.message_id, x.reason) for x in letters.letters] == [("A-m2", "rate_limited")]
    assert order.flag == {"A": "A-m2"}
    assert len(order.lots["A"]) == 1
    core.accept([retry_of("A", 2)])
    await until(lambda: order.flag == {})
    await until(lambda: len(handled(opts)) == 4)
    assert handled(opts) == [f"A-m{i}" for i in range(4)]


class SlowFlags(MemoryDoneStore):
    """A done-store whose write of A-m1's flag waits for `gate`: a flag still being written."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def mark_done(self, message_ids: Sequence[str]) -> None:
        if "A-m1" in message_ids:
            await self.gate.wait()
        await super().mark_done(message_ids)


async def drain_a_chunk_ending_in(
    order: MemoryRetryOrder, store: SlowFlags, fail: str
) -> dict[str, Any]:
    """User A parked behind A-m0 with [m1 ok, m2 `fail`] in the lot; A-m0's retry drains
    them as one chunk. Returns once m2 has failed (its dead letter written), with m1's
    done-flag still being written; then lets the loop run every step that needs no
    timer (the lot and stores here have none: a drop or park that does not wait for
    m1's flag has run by then), and only then lets the flag become durable."""
    core, _done, letters, opts = make(order, store=store, park_drain_chunk=2)
    order.flag["A"] = "A-m0"
    order.lots["A"] = [delivery("A", 1, 1).value, delivery("A", 2, 2, fail=fail).value]
    core.accept([retry_of("A", 0)])
    await until(lambda: any(x.message_id == "A-m2" for x in letters.letters))
    await run_untimed_steps()
    store.gate.set()
    return opts


async def test_next_chunk_after_a_permanent_failure_waits_for_the_chunks_done_flags() -> None:
    """Found by the simulator (seed 108172 once its jitter was seeded): a drained chunk
    [m1, m2]; m1 succeeds (its done-flag still being written), m2 fails for good (no
    park: dead letter, then the drain goes on). The next advance drops the chunk from
    the lot and the drain owner completes, so the partition committed past m1 while m1
    was not durably done: a crash then lost it. Every drop must see its items durably
    done, whatever ended the chunk."""

    store = SlowFlags()
    seen_at_drop: list[bool] = []

    class Watching(MemoryRetryOrder):
        async def advance(
            self, user: str, mid: str, drop_n: int, max_n: int, op_id: str = ""
        ) -> tuple[int, list[bytes]]:
            if drop_n:
                seen_at_drop.append("A-m1" in store.done)
            return await super().advance(user, mid, drop_n, max_n, op_id)

    order = Watching()
    opts = await drain_a_chunk_ending_in(order, store, "permanent")
    await until(lambda: bool(seen_at_drop))
    assert seen_at_drop == [True]
    await until(lambda: order.flag == {})
    assert handled(opts) == ["A-m0", "A-m1"]


async def test_park_of_a_drained_failure_waits_for_the_chunks_done_flags() -> None:
    """Found by the simulator (seed 5510 after the admit became two steps): a drained
    chunk [m1, m2]; m1 succeeds (its done-flag still being written), m2 fails and parks
    the user with drop=2, which removes m1 from the lot. The drop used to happen before
    m1's flag was durable: a crash then lost m1 (its own offset was committed when it
    was parked). The park must see m1 durably done."""

    store = SlowFlags()
    seen_at_park: list[bool] = []

    class Watching(MemoryRetryOrder):
        async def park(self, request: ParkRequest) -> int:
            if request.drop_first:
                seen_at_park.append("A-m1" in store.done)
            return await super().park(request)

    order = Watching()
    opts = await drain_a_chunk_ending_in(order, store, "retryable")
    await until(lambda: bool(seen_at_park))
    assert seen_at_park == [True]
    assert handled(opts) == ["A-m0", "A-m1"]
    assert order.flag == {"A": "A-m2"}

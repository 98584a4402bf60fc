"""HostCore / UserMailbox logic without Ray, Kafka or Redis (in-memory fakes)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from qywx_ray.consume.dedup import MemoryDoneStore
from qywx_ray.consume.mailbox import State, UserMailbox
from qywx_ray.consume.types import Delivery
from tests.helpers.host_fakes import Clock, Letters, delivery, make_core, until


class Deny:
    """Admission that denies listed users and records breaker feedback."""

    def __init__(self, deny: dict[str, str]) -> None:
        self.deny = deny
        self.failures: list[str] = []

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        return {u: [self.deny.get(u)] * n for u, n in requests}

    def on_success(self, user: str) -> None:
        return None

    def on_failure(self, user: str) -> None:
        self.failures.append(user)


async def test_per_user_order_and_a_slow_user_does_not_block_others() -> None:
    core, done, opts = make_core()
    opts["gates"]["A-m0"] = gate = asyncio.Event()
    batch = [delivery("A", i, i) for i in range(5)] + [delivery("B", i, 5 + i) for i in range(5)]
    core.accept(batch)
    await until(lambda: len(done.done) == 5)
    assert sorted(o for _, _, o in done.done) == [5, 6, 7, 8, 9]  # B finished, A held
    assert [m for u, m in opts["calls"] if u == "B"] == [f"B-m{i}" for i in range(5)]
    assert [m for u, m in opts["started"] if u == "A"] == ["A-m0"]  # one at a time
    gate.set()
    await until(lambda: len(done.done) == 10)
    assert [m for u, m in opts["calls"] if u == "A"] == [f"A-m{i}" for i in range(5)]


async def test_completion_waits_for_durable_done_flag() -> None:
    store = MemoryDoneStore()
    core, done, opts = make_core(store=store)
    store.down = True
    core.accept([delivery("A", 0, 0)])
    await asyncio.sleep(0.1)
    assert done.done == []
    assert opts["calls"] == []
    store.down = False
    await until(lambda: len(done.done) == 1)
    assert store.done == {"A-m0"}


async def test_done_flag_write_failure_holds_completion() -> None:
    store = MemoryDoneStore()
    core, done, opts = make_core(store=store)
    opts["gates"]["A-m0"] = gate = asyncio.Event()
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(opts["started"]) == 1)
    store.down = True
    gate.set()
    await until(lambda: len(opts["calls"]) == 1)
    await asyncio.sleep(0.1)
    assert done.done == []  # handler succeeded but the flag is not durable yet
    store.down = False
    await until(lambda: done.done == [("t", 0, 0)])


async def test_already_done_is_skipped_and_pending_duplicate_attaches() -> None:
    store = MemoryDoneStore()
    store.done.add("A-m0")
    core, done, opts = make_core(store=store)
    opts["gates"]["A-m1"] = gate = asyncio.Event()
    core.accept([delivery("A", 0, 0), delivery("A", 1, 1)])
    await until(lambda: len(opts["started"]) == 1)
    await until(lambda: done.done == [("t", 0, 0)])  # skipped without running the handler
    assert opts["started"] == [("A", "A-m1")]
    # The consumer restarted and re-delivers offset 1 (now offset 1 again, other consumer).
    again = delivery("A", 1, 1)._replace(consumer="c1")
    core.accept([again])
    await asyncio.sleep(0.05)
    gate.set()
    await until(lambda: len(done.done) == 3)
    assert opts["calls"] == [("A", "A-m1")]  # ran once, both deliveries completed
    assert store.checks == 1  # one round trip for the first batch, none for the pending one


async def test_failures_are_dead_lettered_with_metadata_before_completion() -> None:
    letters = Letters(fail_times=2)
    core, done, opts = make_core(letters=letters)
    core.accept(
        [
            delivery("A", 0, 7, partition=2, fail="permanent"),
            delivery("A", 1, 8, partition=2, fail="retryable"),
            delivery("A", 2, 9, partition=2),
        ]
    )
    await until(lambda: len(done.done) == 3)
    reasons = [(x.reason, x.retryable, x.partition, x.offset) for x in letters.letters]
    assert reasons == [("invalid_message", False, 2, 7), ("downstream_error", True, 2, 8)]
    assert letters.letters[0].topic == "t"
    assert letters.letters[0].value
    assert opts["calls"] == [("A", "A-m2")]


async def test_handler_timeout_is_process_timeout() -> None:
    letters = Letters()
    core, done, _ = make_core(letters=letters, handler_timeout_s=0.05)
    core.accept([delivery("A", 0, 0, fail="slow")])
    await until(lambda: len(done.done) == 1)
    assert letters.letters[0].reason == "process_timeout"


async def test_poison_record_is_invalid_message() -> None:
    letters = Letters()
    core, done, _ = make_core(letters=letters)
    core.accept([Delivery("t", 0, 3, 0, "A", b"{not json", "", "c0")])
    await until(lambda: len(done.done) == 1)
    assert letters.letters[0].reason == "invalid_message"
    assert letters.letters[0].offset == 3


async def test_denied_and_queue_full_never_wait_behind_a_blocked_user() -> None:
    letters = Letters()
    admission = Deny({"X": "rate_limited"})
    core, done, opts = make_core(letters=letters, admission=admission, mailbox_size=2)
    opts["gates"]["A-m0"] = asyncio.Event()  # A is stuck in its handler
    core.accept([delivery("A", i, i) for i in range(4)] + [delivery("X", 0, 10)])
    await until(lambda: len(done.done) == 3)
    assert sorted(o for _, _, o in done.done) == [2, 3, 10]
    by_reason = sorted((x.reason, x.offset) for x in letters.letters)
    assert by_reason == [("queue_full", 2), ("queue_full", 3), ("rate_limited", 10)]
    assert admission.failures == ["A", "A"]  # queue_full feeds the breaker


async def test_idle_expiry_and_message_arriving_while_dying() -> None:
    clock = Clock()
    release = asyncio.Event()
    dying_seen = asyncio.Event()

    async def slow_death(mb: UserMailbox) -> None:
        dying_seen.set()
        await release.wait()

    core, done, opts = make_core(clock=clock, on_dying=slow_death, idle_lifetime_s=60)
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(done.done) == 1)
    assert core.sweep() == []  # not idle long enough
    clock.t += 61
    assert core.sweep() == ["A"]
    old = core.mailboxes["A"]
    await dying_seen.wait()
    assert old.state is State.DYING
    core.accept([delivery("A", 1, 1), delivery("A", 2, 2)])
    await until(lambda: core.mailboxes.get("A") is not old)
    await asyncio.sleep(0.05)
    assert opts["started"] == [("A", "A-m0")]  # successor waits for the old one to be dead
    release.set()
    await until(lambda: len(done.done) == 3)
    assert opts["calls"] == [("A", "A-m0"), ("A", "A-m1"), ("A", "A-m2")]
    assert old.state is State.DEAD
    assert core.mailboxes["A"].state is State.ACTIVE
    clock.t += 61
    assert core.sweep() == ["A"]
    await until(lambda: "A" not in core.mailboxes)
    await until(core.idle)


@pytest.mark.parametrize("policy", ["process"])
async def test_redis_down_policy_process_runs_without_dedup(policy: str) -> None:
    store = MemoryDoneStore()
    store.down = True
    core, done, opts = make_core(store=store, policy=policy)
    core.accept([delivery("A", 0, 0), delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    assert [m for _, m in opts["calls"]] == ["A-m0", "A-m1"]
    assert not core.dedup.redis_ok


async def test_redis_ok_reports_each_attempt_and_recovers_after_the_retry() -> None:
    store = MemoryDoneStore()
    store.down = True
    core, done, _ = make_core(store=store, policy="stop")
    core.accept([delivery("A", 0, 0)])
    await until(lambda: not core.dedup.redis_ok)  # the check is failing: reported
    assert done.done == []
    store.down = False
    await until(lambda: len(done.done) == 1)
    assert core.dedup.redis_ok  # the retry succeeded: reported again

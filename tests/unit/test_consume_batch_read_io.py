"""The batch read's IO seams (consume/host_io.py `batch_read`, `admit_flagged`) and the
host's fallback under policy process: no Redis, fakes that record what they are asked."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from qywx_ray.consume.batch_reads import BatchAnswer
from qywx_ray.consume.dedup import Deduplicator, MemoryDoneStore
from qywx_ray.consume.handlers import HandlerContext
from qywx_ray.consume.host_io import admit_flagged, batch_read
from qywx_ray.consume.host_rules import BatchReadPlan
from qywx_ray.consume.mailbox import Pending
from qywx_ray.consume.types import ADMITTED, PARKED, WAITED_ON, Delivery
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from tests.helpers.host_fakes import Completions, Letters


class Reads:
    """BatchReads that fails `fail` times (InfraError), then answers `answer`."""

    rates = True

    def __init__(self, fail: int, answer: BatchAnswer | None = None) -> None:
        self.fail = fail
        self.answer = answer or BatchAnswer()
        self.calls = 0

    async def read(self, plan: BatchReadPlan) -> BatchAnswer:
        self.calls += 1
        if self.calls <= self.fail:
            raise InfraError("redis down")
        return self.answer


async def test_policy_stop_retries_the_read_until_it_answers() -> None:
    reads = Reads(fail=2, answer=BatchAnswer(done={"m1"}))
    got = await batch_read(reads, BatchReadPlan(), policy="stop", retry_max_s=0.01)
    assert got is not None
    assert got.done == {"m1"}
    assert reads.calls == 3


async def test_policy_process_gives_up_at_once_so_the_host_makes_the_separate_calls() -> None:
    reads = Reads(fail=1)
    assert await batch_read(reads, BatchReadPlan(), policy="process", retry_max_s=0.01) is None
    assert reads.calls == 1


async def test_a_bug_in_the_read_is_not_retried() -> None:
    class Broken(Reads):
        async def read(self, plan: BatchReadPlan) -> BatchAnswer:
            raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        await batch_read(Broken(0), BatchReadPlan(), policy="process", retry_max_s=0.01)


def _pending(mid: str, user: str, *, token: bool = False) -> Pending:
    d = Delivery("t", 0, 0, 1_000, user, mid.encode(), mid, "c0", 0, token, token)
    env = Envelope(message_id=mid, open_kfid="kf", external_userid=user, msgtype="text")
    return Pending(d, env, [d], skip_handler=token)


class Lot:
    def __init__(self, down: bool = False) -> None:
        self.asked: list[list[str]] = []
        self.down = down

    def parks(self, reason: str) -> bool:
        return True

    async def admit_flagged(self, items: Sequence[tuple[Any, ...]]) -> list[int]:
        self.asked.append([item[1] for item in items])
        if self.down:
            raise InfraError("redis down")
        return [WAITED_ON if item[3] else PARKED for item in items]


async def _policy(what: str, call: Any, n: int) -> Any:
    return await call()


async def _bypass(what: str, call: Any, n: int) -> Any:
    try:
        return await call()
    except InfraError:
        return None


async def test_admit_flagged_asks_the_lot_only_for_flagged_users() -> None:
    items = [_pending("a1", "a"), _pending("b1", "b"), _pending("a2", "a", token=True)]
    lot = Lot()
    codes = await admit_flagged(lot, items, {"a"}, _policy)  # type: ignore[arg-type]
    assert lot.asked == [["a1", "a2"]]
    assert codes == [PARKED, ADMITTED, WAITED_ON]
    lot = Lot()
    assert await admit_flagged(lot, items, set(), _policy) == [ADMITTED] * 3  # type: ignore[arg-type]
    assert lot.asked == []


async def test_admit_flagged_bypassed_still_makes_a_token_ask_the_lot_when_it_runs() -> None:
    items = [_pending("a1", "a"), _pending("a2", "a", token=True)]
    codes = await admit_flagged(Lot(down=True), items, {"a"}, _bypass)  # type: ignore[arg-type]
    assert codes == [ADMITTED, WAITED_ON]


class Admission:
    def __init__(self) -> None:
        self.asked: list[Any] = []

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        self.asked.append(list(requests))
        return {user: [None] * n for user, n in requests}

    def on_success(self, user: str) -> None:
        return None

    def on_failure(self, user: str) -> None:
        return None


def _delivery(offset: int, mid: str, user: str) -> Delivery:
    env = Envelope(message_id=mid, open_kfid="kf", external_userid=user, msgtype="text")
    return Delivery("t", 0, offset, 1_000, user, env.to_bytes(), mid, "c0")


async def _host(
    reads: Reads, admission: Admission, store: MemoryDoneStore, policy: str, letters: Letters
) -> HostCore:
    async def handler(message: Any, ctx: HandlerContext) -> None:
        return None

    return HostCore(
        name="h",
        handler=handler,
        dedup=Deduplicator(store, policy=policy),
        completions=Completions(),
        dead_letters=letters,
        admission=admission,
        batch_reads=reads,
        options=CoreOptions(redis_down_policy=policy, redis_retry_max_s=0.01),
    )


async def test_host_uses_the_batch_reads_answer_and_not_the_separate_calls() -> None:
    store = MemoryDoneStore()
    admission = Admission()
    reads = Reads(fail=0, answer=BatchAnswer(done={"m0"}, reasons={"m1": "rate_limited"}))
    letters = Letters()
    core = await _host(reads, admission, store, "stop", letters)
    core.accept([_delivery(0, "m0", "u"), _delivery(1, "m1", "u"), _delivery(2, "m2", "u")])
    assert core._ingest_task is not None
    await core._ingest_task
    assert reads.calls == 1
    assert store.checks == 0
    assert admission.asked == []
    assert core.counts["duplicate"] == 1  # m0: done per the read
    await asyncio.gather(*core._bg)
    assert [letter.message_id for letter in letters.letters] == [
        "m1"
    ]  # denied per the read: a dead letter (no lot: not parked)
    for w in core._workers:
        w.cancel()
    await asyncio.gather(*core._workers, return_exceptions=True)


async def test_host_under_policy_process_falls_back_to_the_separate_calls() -> None:
    store = MemoryDoneStore()
    store.done.add("m0")
    admission = Admission()
    reads = Reads(fail=1)
    core = await _host(reads, admission, store, "process", Letters())
    core.accept([_delivery(0, "m0", "u"), _delivery(1, "m1", "u")])
    assert core._ingest_task is not None
    await core._ingest_task
    assert reads.calls == 1
    assert store.checks == 1  # the dedup check made on its own
    assert admission.asked == [[("u", 1)]]  # and the limiter, for the fresh m1 only
    assert core.counts["duplicate"] == 1
    for w in core._workers:
        w.cancel()
    await asyncio.gather(*core._workers, return_exceptions=True)

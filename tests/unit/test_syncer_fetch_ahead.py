"""KfSyncer fetches the next page while the current one is produced, and nothing else runs
ahead: a page's produce and cursor commit start only after the previous page's commit.

Fakes for the syncer's stores (no Redis, no Kafka): each test steps the pull with events
and asserts on the recorded order of calls. Real stores: tests/integration/
test_ingest_syncer.py; every fault interleaving: the ingest simulator (tests/sim_ingest).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from qywx_ray.ingest.producer import BatchResult, Delivery
from qywx_ray.ingest.syncer import KfSyncer
from tests.helpers.ingest import FakePage, FakeSource, make_pages

WAIT_S = 10.0  # a bound on each wait, never a sleep
PER_PAGE = 5
PAGE_OF = {f"m{i:05d}": i // PER_PAGE for i in range(0, 100, PER_PAGE)}  # first msgid -> page


class Lease:
    fence = 1


class Locks:
    async def acquire(self, name: str) -> Lease:
        return Lease()

    async def run_locked(self, lease: Lease, work: Callable[[], Awaitable[Any]]) -> Any:
        return await work()


class Cursors:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.cursor = ""

    async def get(self, open_kfid: str) -> str:
        return self.cursor

    async def commit_cursor(self, open_kfid: str, cursor: str, lease: Lease) -> bool:
        self.log.append(f"commit {cursor}")
        self.cursor = cursor
        return True


class Spool:
    def __init__(self, fail_append: bool = False) -> None:
        self.fail_append = fail_append

    async def append_if_spooled(self, envelopes: Sequence[Envelope]) -> set[str]:
        return set()

    async def append(self, envelopes: Sequence[Envelope], **_: Any) -> None:
        if self.fail_append:
            raise InfraError("spool unreachable")


class Source(FakeSource):
    """Records each fetch; a cursor in `gates` waits for its event before answering."""

    def __init__(self, pages: list[list[dict[str, Any]]], log: list[str]) -> None:
        super().__init__(pages)
        self.log = log
        self.gates: dict[str, asyncio.Event] = {}
        self.cancelled: list[str] = []

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
        self.log.append(f"fetch {cursor or '0'}")
        gate = self.gates.get(cursor)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(cursor)
                raise
        return await super().sync_msg(open_kfid, cursor, token, limit)


class Producer:
    """Acks a page once the gate opens; logs pages by number (PAGE_OF)."""

    def __init__(self, log: list[str], fail: bool = False) -> None:
        self.log = log
        self.fail = fail
        self.started = asyncio.Event()
        self.gate = asyncio.Event()

    async def produce_batch(self, envelopes: Sequence[Envelope]) -> BatchResult:
        page = PAGE_OF[envelopes[0].message_id]
        self.log.append(f"produce {page}")
        self.started.set()
        await asyncio.sleep(0)  # the wait for acks is IO: other tasks run meanwhile
        await self.gate.wait()
        self.log.append(f"acked {page}")
        error = InfraError("kafka down") if self.fail else None
        return BatchResult([Delivery(e, error) for e in envelopes])


def syncer(source: Source, producer: Producer, log: list[str], spool: Spool | None = None) -> Any:
    return KfSyncer(
        "kf",
        source=source,
        producer=producer,  # type: ignore[arg-type]
        locks=Locks(),  # type: ignore[arg-type]
        cursors=Cursors(log),  # type: ignore[arg-type]
        spool=spool or Spool(),  # type: ignore[arg-type]
    )


async def test_the_next_page_is_fetched_while_this_one_is_produced_and_commits_stay_in_order() -> (
    None
):
    log: list[str] = []
    source = Source(make_pages(3, PER_PAGE, users=2), log)
    producer = Producer(log)
    pull = asyncio.create_task(syncer(source, producer, log).pull_once())
    await asyncio.wait_for(producer.started.wait(), WAIT_S)
    for _ in range(5):  # let the fetch-ahead run (loop turns, no time)
        await asyncio.sleep(0)
    assert log == ["fetch 0", "produce 0", "fetch 1"]  # page 1 fetched, page 0 not acked
    producer.gate.set()
    result = await asyncio.wait_for(pull, WAIT_S)
    assert (result.pages, result.messages, result.produced, result.cursor) == (3, 15, 15, "3")
    # Each page: produced, acked, committed, before the next page's produce; the last
    # page (has_more false) fetches nothing ahead.
    assert [e for e in log if not e.startswith("fetch")] == [
        "produce 0",
        "acked 0",
        "commit 1",
        "produce 1",
        "acked 1",
        "commit 2",
        "produce 2",
        "acked 2",
        "commit 3",
    ]
    assert log.index("fetch 2") < log.index("acked 1")
    assert [c[1] for c in source.calls] == ["", "1", "2"]


async def test_a_page_neither_acked_nor_spooled_drops_the_page_fetched_ahead() -> None:
    log: list[str] = []
    source = Source(make_pages(2, PER_PAGE, users=2), log)
    source.gates["1"] = asyncio.Event()  # the fetch-ahead is still waiting on WeCom
    producer = Producer(log, fail=True)
    producer.gate.set()
    try:
        await asyncio.wait_for(
            syncer(source, producer, log, Spool(fail_append=True)).pull_once(), WAIT_S
        )
    except InfraError:
        pass
    else:
        raise AssertionError("a page neither produced nor spooled must fail the pull")
    for _ in range(5):
        await asyncio.sleep(0)
    assert source.cancelled == ["1"]  # dropped, not left running
    assert [e for e in log if e.startswith(("commit", "produce"))] == ["produce 0"]


async def test_a_cancelled_pull_cancels_its_fetch_ahead() -> None:
    log: list[str] = []
    source = Source(make_pages(3, PER_PAGE, users=2), log)
    source.gates["1"] = asyncio.Event()
    producer = Producer(log)
    pull = asyncio.create_task(syncer(source, producer, log).pull_once())
    await asyncio.wait_for(producer.started.wait(), WAIT_S)
    for _ in range(5):
        await asyncio.sleep(0)
    assert log[-1] == "fetch 1"
    pull.cancel()
    done, _ = await asyncio.wait({pull}, timeout=WAIT_S)
    assert done
    assert pull.cancelled()
    for _ in range(5):
        await asyncio.sleep(0)
    assert source.cancelled == ["1"]
    assert not [e for e in log if e.startswith("commit")]


async def test_a_rejected_cursor_met_by_the_fetch_ahead_restarts_once_from_the_oldest() -> None:
    """The fetch-ahead's WeComError surfaces once page 0 is committed, with that page's
    cursor, and the pull restarts from "" exactly as a serial fetch would have."""
    log: list[str] = []
    pages = make_pages(2, PER_PAGE, users=2)

    class RejectsCursorOne(Source):
        rejected = False

        async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
            if cursor == "1" and not self.rejected:
                self.rejected = True
                self.log.append("fetch 1 rejected")
                return FakePage(errcode=40058, errmsg="invalid cursor")
            return await super().sync_msg(open_kfid, cursor, token, limit)

    source = RejectsCursorOne(pages, log)
    producer = Producer(log)
    producer.gate.set()
    result = await asyncio.wait_for(syncer(source, producer, log).pull_once(), WAIT_S)
    assert log == [
        "fetch 0",
        "produce 0",
        "fetch 1 rejected",  # ahead, while page 0 is produced
        "acked 0",
        "commit 1",  # page 0 done; now the rejection: back to the oldest message
        "commit ",
        "fetch 0",
        "produce 0",
        "fetch 1",
        "acked 0",
        "commit 1",
        "produce 1",
        "acked 1",
        "commit 2",
    ]
    assert (result.pages, result.produced, result.cursor) == (3, 15, "2")

"""Every ingest background loop survives an exception nobody expected (not an InfraError):
it is logged, counted in qywx_ingest_loop_errors_total{loop} (the shed middleware's in
qywx_callbacks_shed_loop_errors_total) and the loop goes on, backing off while it keeps
failing. Async loops run on the simulators' virtual-time loop: the delays asserted are
the ones the code chose, not wall time."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from qywx_ray.ingest.locks import LockLease, LockLostError, LockManager
from qywx_ray.ingest.loops import LOOP_ERRORS, LoopBackoff
from qywx_ray.ingest.producer import KafkaIngestProducer
from qywx_ray.ingest.settings import IngestSettings
from qywx_ray.ingest.spool import ReplayResult, SpoolReplayer
from qywx_ray.ingest.syncer import KfSyncer, PullResult
from qywx_ray.ingress.dispatch import PullDispatcher
from qywx_ray.ingress.shedding import SHED_LOOP_ERRORS, LoadShedder, ShedBacklog, ShedMiddleware
from qywx_ray.kafka.settings import KafkaSettings
from qywx_ray.wecom.models import KfCallbackEvent
from tests.helpers.callbacks import CRYPTO, App, RecordingSink
from tests.helpers.wait import wait_until
from tests.sim.vtime import VirtualTimeLoop, run_virtual

T = TypeVar("T")
UNUSED: Any = None  # collaborators the overridden method never reaches


def virtual(main: Callable[[], Awaitable[T]]) -> T:
    return run_virtual(VirtualTimeLoop(), main())  # type: ignore[no-any-return]


def errors(loop: str) -> float:
    return LOOP_ERRORS.value(loop=loop)


def test_backoff_doubles_while_failing_up_to_its_cap_and_resets_on_success() -> None:
    b = LoopBackoff(2.0, 10.0)
    assert [b.failed() for _ in range(4)] == [2.0, 4.0, 8.0, 10.0]
    b.succeeded()
    assert b.failed() == 2.0


# ------------------------------------------------------------------ spool replayer
class ExplodingReplayer(SpoolReplayer):
    """replay_once raises two unexpected errors, then works; stop after the third call."""

    def __init__(self, stop: asyncio.Event) -> None:
        super().__init__(UNUSED, UNUSED, UNUSED)
        self.stop = stop
        self.calls: list[float] = []

    async def replay_once(self) -> ReplayResult:
        self.calls.append(asyncio.get_running_loop().time())
        if len(self.calls) == 1:
            raise RuntimeError("a bug")
        if len(self.calls) == 2:
            raise KeyError("a corrupt reply")
        if len(self.calls) == 4:
            self.stop.set()
        return ReplayResult()


def test_the_replay_loop_survives_any_exception_and_backs_off() -> None:
    """Before: SpoolReplayer.run caught only InfraError; the RuntimeError ended it and
    nothing drained the spool again."""
    before = errors("spool_replay")

    async def main() -> list[float]:
        stop = asyncio.Event()
        replayer = ExplodingReplayer(stop)
        await replayer.run(2.0, stop)
        return replayer.calls

    calls = virtual(main)
    # failed: 2 s, failed again: 4 s, then back to the 2 s interval after a success
    assert calls == [0.0, 2.0, 6.0, 8.0]
    assert errors("spool_replay") == before + 2


# ------------------------------------------------------------------ syncer pull loop
class ExplodingSyncer(KfSyncer):
    def __init__(self) -> None:
        settings = IngestSettings(backoff_initial_s=1.0, backoff_max_s=60.0)
        super().__init__(
            "wk1",
            source=UNUSED,
            producer=UNUSED,
            locks=UNUSED,
            cursors=UNUSED,
            spool=UNUSED,
            settings=settings,
            clock=lambda: asyncio.get_running_loop().time(),
            rng=lambda: 0.5,  # the jitter factor is then exactly 1
        )
        self.calls: list[float] = []

    async def pull_once(self) -> PullResult:
        self.calls.append(asyncio.get_running_loop().time())
        if len(self.calls) == 1:
            raise RuntimeError("a bug")
        self.stop()
        return PullResult("done")


def test_the_sync_loop_survives_any_exception_and_backs_off() -> None:
    before = errors("sync")

    async def main() -> list[float]:
        syncer = ExplodingSyncer()
        await syncer.run()
        return syncer.calls

    assert virtual(main) == [0.0, 1.0]
    assert errors("sync") == before + 1


# ------------------------------------------------------------------ lock extender
class _Scripts:
    def register_script(self, _text: str) -> object:
        return object()


class FlakyLocks(LockManager):
    """extend raises something unexpected `failures` times (forever if None), then works."""

    def __init__(self, failures: int | None) -> None:
        super().__init__(_Scripts(), ttl_s=3.0, extend_every_s=1.0)  # type: ignore[arg-type]
        self.clock = lambda: asyncio.get_running_loop().time()
        self.failures = failures
        self.extends = 0
        self.released = 0

    async def extend(self, lease: LockLease) -> bool:
        self.extends += 1
        if self.failures is None or self.extends <= self.failures:
            raise ValueError("unexpected reply")
        return True

    async def release(self, lease: LockLease) -> bool:
        self.released += 1
        return True


def lease() -> LockLease:
    return LockLease("sync:wk1", "qywx:lock:sync:wk1", "token", 1, 0.0)


def test_the_lock_extender_survives_one_unexpected_error() -> None:
    """Before: _keep caught only InfraError; the ValueError ended the extender and the
    work ran on, its lease expiring under it."""
    before = errors("lock_extend")
    locks = FlakyLocks(failures=1)

    async def work() -> str:
        await asyncio.sleep(5.5)
        return "done"

    assert virtual(lambda: locks.run_locked(lease(), work)) == "done"
    assert locks.extends == 5
    assert locks.released == 1
    assert errors("lock_extend") == before + 1


def lease_lost_at(locks: FlakyLocks, work: Callable[[], Awaitable[None]]) -> float:
    """The virtual time at which run_locked(work) raised LockLostError."""

    async def main() -> float:
        with pytest.raises(LockLostError):
            await locks.run_locked(lease(), work)
        return asyncio.get_running_loop().time()

    return virtual(main)


def test_an_extender_that_keeps_failing_gives_the_lease_up_after_its_ttl() -> None:
    """Failing for a whole TTL (3 s) means the lease may be gone: the work is cancelled."""
    locks = FlakyLocks(failures=None)
    finished: list[bool] = []

    async def work() -> None:
        await asyncio.sleep(60)
        finished.append(True)

    assert lease_lost_at(locks, work) == 3.0
    assert not finished
    assert locks.released == 0


def test_work_that_drops_a_cancel_still_stops_when_the_lease_is_lost() -> None:
    """A pull whose Redis call dropped the cancel (Python 3.11's wait_for returns the
    result when both land in one turn) went on for its whole length on a lost lease."""
    locks = FlakyLocks(failures=None)
    finished: list[bool] = []

    async def work() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # dropped, as wait_for does
            await asyncio.sleep(60)
        await asyncio.sleep(60)
        finished.append(True)

    assert lease_lost_at(locks, work) == 3.0
    assert not finished


class SlowExtendLocks(FlakyLocks):
    """extend takes 0.5 s and drops the first cancel it gets (as wait_for does)."""

    def __init__(self) -> None:
        super().__init__(failures=0)
        self.dropped = 0

    async def extend(self, lease: LockLease) -> bool:
        self.extends += 1
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            if self.dropped:
                raise
            self.dropped += 1
        return True


def test_an_extender_that_drops_a_cancel_still_stops_when_the_work_ends() -> None:
    """The work ends while the extender is inside extend (1.0-1.5 s) and the extender's
    one cancel is dropped: run_locked waited for an extender that went on for ever."""
    locks = SlowExtendLocks()

    async def work() -> str:
        await asyncio.sleep(1.2)
        return "done"

    async def main() -> tuple[str, float]:
        task = asyncio.ensure_future(locks.run_locked(lease(), work))
        done, _ = await asyncio.wait({task}, timeout=3600)  # virtual seconds: a guard
        assert done, "run_locked still waiting for its extender an hour later"
        return task.result(), asyncio.get_running_loop().time()

    assert virtual(main) == ("done", 1.2)
    assert locks.dropped == 1
    assert locks.released == 1


# ------------------------------------------------------------------ pull dispatcher
class ExplodingDispatcher(PullDispatcher):
    def __init__(self, sent: list[list[tuple[str, str]]]) -> None:
        async def send(host: int, items: list[tuple[str, str]]) -> None:
            sent.append(items)

        super().__init__(send, num_hosts=1, retry_initial_s=0.2)
        self.flushes = 0

    async def flush(self) -> bool:
        self.flushes += 1
        if self.flushes == 1:
            raise RuntimeError("a bug")
        return await super().flush()


def event(kfid: str) -> KfCallbackEvent:
    return KfCallbackEvent.model_validate(
        {
            "ToUserName": "corp",
            "CreateTime": 1,
            "MsgType": "event",
            "Event": "kf_msg_or_event",
            "Token": "tok",
            "OpenKfId": kfid,
        }
    )


def test_the_pull_dispatcher_survives_any_exception() -> None:
    """Before: the flusher task ended on the RuntimeError; the pending pull request waited
    for the next callback (forever, if none came)."""
    before = errors("pull_dispatch")
    sent: list[list[tuple[str, str]]] = []

    async def main() -> None:
        dispatcher = ExplodingDispatcher(sent)
        dispatcher.submit(event("wk1"))
        while not sent:
            await asyncio.sleep(0.1)
        await dispatcher.aclose()

    virtual(main)
    assert sent == [[("wk1", "tok")]]
    assert errors("pull_dispatch") == before + 1


# ------------------------------------------------------------------ producer poll thread
class RaisingClient:
    """A librdkafka stand-in whose poll raises on its first call (a callback raised)."""

    def __init__(self) -> None:
        self.polls = 0
        self.polled = threading.Event()

    def poll(self, timeout: float) -> int:
        self.polls += 1
        if self.polls == 1:
            raise RuntimeError("a delivery callback raised")
        if self.polls >= 3:
            self.polled.set()
        self.polled.wait(timeout)  # as librdkafka blocks up to timeout
        return 0

    def flush(self, timeout: float = 0) -> int:
        return 0


class RaisingPollProducer(KafkaIngestProducer):
    def _new_client(self) -> Any:
        return RaisingClient()


def test_the_poll_thread_survives_any_exception() -> None:
    before = errors("kafka_poll")
    producer = RaisingPollProducer(KafkaSettings())
    client = producer._producer
    assert isinstance(client, RaisingClient)
    try:
        wait_until(lambda: client.polls >= 3, timeout_s=10, what="polls after the error")
    finally:
        producer.close(1)
    assert errors("kafka_poll") == before + 1


# ------------------------------------------------------------------ shed middleware
class ExplodingShedder(LoadShedder):
    def __init__(self) -> None:
        super().__init__(max_inflight=10, max_loop_lag_s=1.0, lag_probe_interval_s=0.05)
        self.observed = 0

    def observe_loop_lag(self, lag_s: float) -> None:
        self.observed += 1
        if self.observed == 1:
            raise RuntimeError("a bug")
        super().observe_loop_lag(lag_s)


class ExplodingShed(ShedMiddleware):
    def __init__(self) -> None:
        super().__init__(
            App(),
            shedder=ExplodingShedder(),
            backlog=ShedBacklog(10),
            crypto=CRYPTO,
            sink=RecordingSink(),
            drain_interval_s=0.5,
        )
        self.drains = 0

    async def _drain_once(self) -> None:
        self.drains += 1
        if self.drains == 1:
            raise RuntimeError("a bug")
        await super()._drain_once()


def test_the_shed_loops_survive_any_exception() -> None:
    probe_before = SHED_LOOP_ERRORS.value(loop="lag_probe")
    drain_before = SHED_LOOP_ERRORS.value(loop="drain")
    mw = ExplodingShed()

    async def main() -> None:
        mw._start_background()
        await asyncio.sleep(2.1)
        await mw.aclose()

    virtual(main)
    assert mw.drains == 4
    assert mw.shedder.observed > 10  # type: ignore[attr-defined]  # the test's counting shedder
    assert SHED_LOOP_ERRORS.value(loop="lag_probe") == probe_before + 1
    assert SHED_LOOP_ERRORS.value(loop="drain") == drain_before + 1


async def test_wait_set_answers_whether_the_event_was_set_and_lets_a_cancel_through() -> None:
    from qywx_ray.ingest.loops import wait_set

    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False  # not set: the bound ends the wait
    event.set()
    assert await wait_set(event, 30) is True  # set: returns at once, the bound unused
    event.clear()
    waiter = asyncio.create_task(wait_set(event, 30))
    await asyncio.sleep(0)  # one turn: the waiter is inside event.wait()
    event.set()  # set in the same turn as the cancel: the cancel must still win
    waiter.cancel()
    done, _ = await asyncio.wait({waiter}, timeout=5)
    assert done
    assert waiter.cancelled()

"""The asyncio core that hosts many per-user mailboxes ("virtual user actors").

`HostCore` owns many `UserMailbox`es inside one asyncio loop. It is the shell that
sequences the awaits; each concern is its own module:
- intake (host_intake.py): a delivery batch, in order, to placed mailbox work, with
  ONE Redis round trip per batch in the common case (done-flags, parking flags and the
  rate limiter);
- the parking lot's await sequences (host_lot.py): hold, park, settle, drain, under one
  lane, so Redis applies them in the order the host decided them;
- per-user state (host_state.py): loaded on activation, a fresh copy per attempt, one
  version-checked commit with the done-flag;
- what leaves the host (host_report.py): completions in batches, counters, latencies;
- the decisions (pure, unit-tested without a loop): host_rules.py (intake, denials, a
  head's outcome) and mailbox_machine.py (pending ids, mailboxes, park / drain / finish
  bookkeeping and lifecycle); the outside calls and their failure policies: host_io.py.
What stays here: the handler slots (workers), a head's run (`_process`: breaker, handler,
state, then the durable outcome), finishing and completing, dead letters, lifecycle.

Per-user order across DLQ retries (proven by the simulator in tests/sim):
- Only a mailbox HEAD may park its user (every older message has finished): a failure
  parks the user behind it with the queued later messages in front of the lot, BEFORE
  its dead letter (a drained message, which has no record of its own: after it).
- A full mailbox never denies: the overflow is held in the lot behind the newest queued
  message (with its Kafka position, so older redelivered records still run).
- A settled blocker drains the lot chunk by chunk (host_lot.py).
Lifecycle: active -> dying -> dead after `idle_lifetime_s` without work; a message
arriving while a mailbox is dying goes to a successor that starts only after the old one
is dead. Never: report a completion before the done-flag or dead letter is durable, run
two messages of one user at once, or admit past protection while Redis is down under
policy `stop`. Pure asyncio: no Ray, no Kafka; Redis only behind the seams (DoneStore,
Admission, RetryOrder, DrainTokenSink, BatchReads, StateStore).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qywx_ray.consume.batch_reads import BatchReads
from qywx_ray.consume.deadlines import HandlerDeadlines
from qywx_ray.consume.dedup import Deduplicator
from qywx_ray.consume.handlers import (
    Handler,
    HandlerContext,
    make_context_logger,
    wants_typed_message,
)
from qywx_ray.consume.host_intake import Intake
from qywx_ray.consume.host_io import dead_letter, durable_dead_letter, run_head
from qywx_ray.consume.host_lot import LotSteps
from qywx_ray.consume.host_report import HostReport, m_failures
from qywx_ray.consume.host_rules import Outcome
from qywx_ray.consume.host_state import HostStates
from qywx_ray.consume.mailbox import Pending, UserMailbox
from qywx_ray.consume.mailbox_machine import MailboxMachine
from qywx_ray.consume.state import DEFAULT_STATE_MAX_BYTES, StateStore, StateWrite, state_spec
from qywx_ray.consume.types import (
    REASON_CIRCUIT_OPEN,
    Admission,
    AllowAll,
    CompletionSink,
    DeadLetter,
    DeadLetterSink,
    Delivery,
    DrainTokenSink,
    RetryOrder,
)
from qywx_ray.obs.logging import get_logger
from qywx_ray.protect.breaker import CircuitBreaker
from qywx_ray.protect.settings import BreakerSettings

log = get_logger(__name__)


@dataclass
class CoreOptions:
    mailbox_size: int = 1000
    idle_lifetime_s: float = 10_800.0
    handler_timeout_s: float = 30.0
    handler_concurrency: int = 1000
    completion_flush_ms: float = 20.0
    latency_samples: int = 200_000
    handler_options: dict[str, Any] = field(default_factory=dict)
    breaker: BreakerSettings | None = None  # per-user circuit breaker; None = none
    redis_down_policy: str = "stop"  # admission/parking while Redis is down: stop | process
    redis_retry_max_s: float = 5.0
    park_drain_chunk: int = 200
    handler_infra_retry_s: float = 60.0  # a handler's Redis outage: retried in place this long
    state_max_bytes: int = DEFAULT_STATE_MAX_BYTES  # a stateful handler's encoded state


class HostCore:
    """All user mailboxes of one host (or the single user of a dedicated actor)."""

    def __init__(
        self,
        *,
        name: str,
        handler: Handler,
        dedup: Deduplicator,
        completions: CompletionSink,
        dead_letters: DeadLetterSink,
        admission: Admission | None = None,
        retry_order: RetryOrder | None = None,
        drain_tokens: DrainTokenSink | None = None,
        options: CoreOptions | None = None,
        redis: Any = None,
        wecom: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        on_dying: Callable[[UserMailbox], Awaitable[None]] | None = None,
        on_fatal: Callable[[str], None] | None = None,
        state_store: StateStore | None = None,
        batch_reads: BatchReads | None = None,
    ) -> None:
        self.name = name
        self.handler = handler
        self.dedup = dedup
        self.sink = dead_letters
        self.admission: Admission = admission or AllowAll()
        self.opt = opt = options or CoreOptions()
        self.redis = redis
        self.wecom = wecom
        self.clock = clock
        self.wall_ms = wall_ms
        self.on_dying = on_dying
        self.on_fatal = on_fatal  # a bug left state inconsistent: the shell crashes and restarts
        # The mailboxes' bookkeeping (pure: intake, placement, park, drain, finish,
        # lifecycle); this shell does the awaits and reports their outcomes to it.
        self.machine = MailboxMachine(self._new_breaker)
        self.mailboxes: dict[str, UserMailbox] = self.machine.mailboxes
        self.pending: dict[str, Pending] = self.machine.pending
        self.report = HostReport(
            name,
            completions,
            flush_ms=opt.completion_flush_ms,
            latency_samples=opt.latency_samples,
            active=lambda: len(self.mailboxes),
        )
        self.counts = self.report.counts
        # Per-user state only for a handler that declares it: otherwise no load and no
        # state work in the commit (consume/state.py).
        spec = state_spec(handler)
        self.states: HostStates | None = None
        if spec is not None:
            store = state_store or getattr(dedup, "store", None)
            if store is None or not hasattr(store, "load"):
                raise ValueError("a stateful handler needs a state store")
            self.states = HostStates(
                spec,
                store,
                host=name,
                max_bytes=opt.state_max_bytes,
                retry_max_s=opt.redis_retry_max_s,
                on_fatal=on_fatal,
            )
            dedup.require_checks()  # never run a done message against a state holding it
        # One lane for every parking-lot call of this host (admit, park, hold, advance):
        # Redis applies them in the order the host decided them, and the mailbox snapshot
        # a park pushes is taken while no admit can be in flight
        # (tests/unit/test_consume_order_defects.py).
        self._lane = asyncio.Lock()
        self.lot = LotSteps(
            lot=retry_order,
            machine=self.machine,
            dedup=dedup,
            lane=self._lane,
            report=self.report,
            host=self,
            drain_tokens=drain_tokens,
            drain_chunk=opt.park_drain_chunk,
            retry_max_s=opt.redis_retry_max_s,
        )
        # One Redis call per delivery batch for the dedup check, the parking flags and
        # the rate limiter (consume/batch_reads.py); None: the three separate calls.
        self.intake = Intake(
            machine=self.machine,
            dedup=dedup,
            admission=self.admission,
            batch_reads=batch_reads,
            lot=self.lot,
            states=self.states,
            report=self.report,
            host=self,
            mailbox_size=opt.mailbox_size,
            redis_down_policy=opt.redis_down_policy,
            retry_max_s=opt.redis_retry_max_s,
            clock=clock,
        )
        self._inbox: deque[list[Delivery]] = deque()
        self._ingest_task: asyncio.Task[None] | None = None
        self._ingesting = False
        self._ready: asyncio.Queue[UserMailbox] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._ctx_log = make_context_logger()
        self._typed = wants_typed_message(handler)  # else the handler gets the Envelope
        self._deadlines = HandlerDeadlines(opt.handler_timeout_s)

    # ------------------------------------------------------------ intake

    def accept(self, batch: list[Delivery]) -> None:
        """Called in the loop thread: queue a delivery batch for ordered ingest."""
        if batch:
            self.report.arrived(self.wall_ms() - batch[0].timestamp_ms)
        self._inbox.append(batch)
        if self._ingest_task is None or self._ingest_task.done():
            self._ingest_task = asyncio.get_running_loop().create_task(self._ingest_loop())

    @property
    def busy_ingesting(self) -> bool:
        return bool(self._inbox) or self._ingesting

    async def _ingest_loop(self) -> None:
        while self._inbox:
            self._ingesting = True
            try:
                items: list[Delivery] = []
                while self._inbox:
                    items.extend(self._inbox.popleft())
                # The whole ingest holds the lane: while a drain or park talks to the lot,
                # no batch is half-way (registered as pending but not yet placed), so a
                # drained message never meets a copy of itself in flight.
                async with self._lane:
                    await self.intake.ingest(items)
            except Exception:
                log.error("host.ingest_failed", exc_info=True, host=self.name)
                if self.on_fatal is not None:
                    self.on_fatal("ingest failed")
                raise
            finally:
                self._ingesting = False

    # ------------------------------------------------------------ mailboxes

    def _new_breaker(self, user: str) -> CircuitBreaker | None:
        if self.opt.breaker is None:
            return None
        return CircuitBreaker(self.opt.breaker, user=user, clock=self.clock)

    def start(self, mb: UserMailbox) -> None:
        """`mb` got its first work: schedule it once its predecessor is dead."""
        if mb.predecessor is not None and not mb.predecessor.dead.is_set():
            self._spawn(self._after_predecessor(mb))
        else:
            mb.predecessor = None
            self._schedule(mb)

    async def _after_predecessor(self, mb: UserMailbox) -> None:
        assert mb.predecessor is not None
        await mb.predecessor.dead.wait()
        mb.predecessor = None
        self._schedule(mb)

    def _schedule(self, mb: UserMailbox) -> None:
        """Put a mailbox with work on the ready queue (at most once: one message at a time)."""
        self._ready.put_nowait(mb)
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [
                loop.create_task(self._worker()) for _ in range(self.opt.handler_concurrency)
            ]

    async def _worker(self) -> None:
        """Handler slots: take the next ready user, run ONE of its messages, requeue it."""
        while True:
            mb = await self._ready.get()
            p = mb.queue[0]
            mb.busy = True
            try:
                await self._process(mb, p)
            except BaseException as exc:
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                    raise  # shutdown
                # A bug left this mailbox's state unknown: crash-only, the shell restarts
                # and everything unfinished is re-delivered. The worker itself goes on.
                log.error("host.process_failed", exc_info=True, user=mb.user)
                if self.on_fatal is not None:
                    self.on_fatal("process failed")
            finally:
                self.machine.head_done(mb, self.clock())
            if self.machine.next_turn(mb):  # round robin: the user goes to the back
                self._ready.put_nowait(mb)

    # ------------------------------------------------------------ a head's run

    async def _process(self, mb: UserMailbox, p: Pending) -> None:
        """Run the head of `mb` to a durable outcome. Only the head may park the user: every
        older message of the user has finished, so nothing can overtake it."""
        if p.skip_handler:  # a drain token (or a done retry): drain the lot, run nothing
            await self.lot.drain(mb, p, 0)
            return
        reason, error, write = await self._run(mb, p)
        step = self.machine.head_finished(p, reason, self.lot.parks)
        if reason is None:
            await self._succeeded(mb, p, step, write)
        else:
            await self._failed(mb, p, step, reason, error)

    async def _run(self, mb: UserMailbox, p: Pending) -> tuple[str | None, str, StateWrite | None]:
        """The head's attempt: (failure reason or None, error text, the state commit).
        A denial decided at intake or an open breaker fails it without running."""
        if p.denied is not None:
            return p.denied, f"denied: {p.denied}", None
        if mb.breaker is not None:
            if not mb.breaker.allow():
                return REASON_CIRCUIT_OPEN, "denied: circuit_open", None
            mb.breaker.on_success()
        env, d = p.envelope, p.delivery
        self.report.started(d, self.wall_ms())
        ctx = HandlerContext(
            user_id=env.external_userid,
            open_kfid=env.open_kfid,
            message_id=env.message_id,
            envelope=env,
            attempt=d.retry_count + 1,
            log=self._ctx_log,
            redis=self.redis,
            wecom=self.wecom,
            options=self.opt.handler_options,
        )
        states = self.states
        slot = None
        if states is not None:  # loaded once per activation: no coroutine per message after
            slot = mb.user_state if mb.user_state is not None else await states.slot(mb)
        t0 = time.perf_counter()
        reason, error = await run_head(
            self.handler,
            self._typed,
            self._deadlines,
            env,
            ctx,
            clock=self.clock,
            infra_retry_s=self.opt.handler_infra_retry_s,
            retry_max_s=self.opt.redis_retry_max_s,
            fresh_state=states.fresh(slot) if states is not None and slot is not None else None,
        )
        self.report.ran(time.perf_counter() - t0)
        if reason is None and states is not None and slot is not None:
            write, reason, error = states.write(mb, slot, ctx.state)
            return reason, error, write
        return reason, error, None

    async def _succeeded(
        self, mb: UserMailbox, p: Pending, step: Outcome, write: StateWrite | None
    ) -> None:
        """The done-flag (with the state change) is written in a batch; the message
        completes only once it is durable."""
        self.admission.on_success(mb.user)
        self.counts["processed"] += 1
        mid = p.envelope.message_id
        states = self.states
        refused = functools.partial(states.refused, mb, mid) if states is not None else None
        if step is Outcome.DONE:
            self.dedup.mark_done(mid, lambda: self.finish(p, mb), write, refused)
            return
        # Durable done-flag first: the lot drops a chunk only once every message of it
        # is durably done (flags are written in order), then the parked messages run,
        # in order.
        durable = asyncio.get_running_loop().create_future()
        self.dedup.mark_done(mid, lambda: durable.set_result(None), write, refused)
        await durable
        await self.lot.settle(mb, p)

    async def _failed(
        self, mb: UserMailbox, p: Pending, step: Outcome, reason: str, error: str
    ) -> None:
        """A failed head: park its user behind it (a retryable reason with a lot), then
        its dead letter; or its dead letter, then the user goes on."""
        env, d = p.envelope, p.delivery
        if p.denied is None:
            self.admission.on_failure(mb.user)
        m_failures.inc(reason=reason)
        log.warning(
            "handler.failed", user=mb.user, message_id=env.message_id, reason=reason, error=error
        )
        letter = dead_letter(d, env, reason, error)
        if step is Outcome.PARK_DRAINED:
            # A drained message has no record of its own: its place is in the lot, held
            # by the drain owner's record. Its dead letter is made durable while it is
            # still there, and only then the park drops it from the lot (a crash in
            # between runs it once more from the lot; none loses it). Its retry cannot
            # slip past meanwhile: see Pending.late_retries.
            await self._dead_letter([letter])
            owner = await self.lot.park_behind(mb, p)
        elif step is Outcome.PARK_RECORDED:
            # Its own record stays uncommitted until the dead letter is durable.
            owner = await self.lot.park_behind(mb, p)
            await self._dead_letter([letter])
        else:
            # Durable before we move on: the user's next message waits for this dead
            # letter. Waited on: the blocker is settled for good (review), release the
            # user. A chunk's end not retried (e.g. invalid): the rest of the lot goes on.
            await self._dead_letter([letter])
            await self.lot.settle(mb, p)
            return
        self.finish(p, mb)
        if owner is not None and owner is not p:  # it held the drained p's place
            self.finish(owner, mb)

    def finish(self, p: Pending, mb: UserMailbox | None) -> None:
        done = self.machine.finish(p, mb, self.clock())
        for w in done.complete:
            self.complete(w)
        if done.reingest:  # a failed attempt's retry is the next attempt: ingest it now
            self.accept(done.reingest)

    # ------------------------------------------------------------ dead letters

    async def _dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        await durable_dead_letter(self.sink, letters, self.name)
        self.counts["dead_letter"] += len(letters)

    def dead_letter_later(
        self,
        letters: Sequence[DeadLetter],
        finish: Sequence[Pending] = (),
        complete: Sequence[Delivery] = (),
    ) -> None:
        """Write `letters` in the background (nothing waits on them in a mailbox), then
        finish `finish` and complete `complete`: only once they are durable."""
        self._spawn(self._dead_letter_then(letters, finish, complete))

    async def _dead_letter_then(
        self, letters: Sequence[DeadLetter], finish: Sequence[Pending], complete: Sequence[Delivery]
    ) -> None:
        await self._dead_letter(letters)
        for p in finish:
            self.finish(p, None)
        for d in complete:
            self.complete(d)

    # ------------------------------------------------------------ completions

    def complete(self, d: Delivery) -> None:
        self.report.complete(d)

    # ------------------------------------------------------------ lifecycle

    def sweep(self) -> list[str]:
        """Start dying for every mailbox idle longer than idle_lifetime_s; returns users."""
        expired = self.machine.expire(self.clock(), self.opt.idle_lifetime_s)
        for mb in expired:
            self._spawn(self._die(mb))
        return [mb.user for mb in expired]

    async def _die(self, mb: UserMailbox) -> None:
        try:
            if self.on_dying is not None:
                await self.on_dying(mb)
            else:
                await asyncio.sleep(0)
        finally:
            self.machine.died(mb)
            mb.dead.set()

    def idle(self) -> bool:
        """Nothing queued, running, pending durability or unreported (dedicated actors)."""
        return (
            not self.mailboxes
            and not self.pending
            and not self.busy_ingesting
            and not self._bg
            and self.report.completions_pending == 0
            and self.dedup.pending_marks == 0
        )

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ------------------------------------------------------------ introspection

    def snapshot(self, limit: int = 1000) -> dict[str, Any]:
        now = self.clock()
        users = [mb.snapshot(now) for mb in list(self.mailboxes.values())[:limit]]
        return {
            "host": self.name,
            "users": len(self.mailboxes),
            "pending": len(self.pending),
            "counts": dict(self.counts),
            "redis_ok": self.dedup.redis_ok,
            "mailboxes": users,
        }

    def latency_stats(self, reset: bool = False) -> dict[str, Any]:
        return self.report.latency_stats(reset)

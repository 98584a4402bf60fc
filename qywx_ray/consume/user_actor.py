"""The asyncio core that hosts many per-user mailboxes ("virtual user actors").

`HostCore` owns many `UserMailbox`es inside one asyncio loop: it ingests delivery batches
in order, applies admission (rate limit at each message's send time, then the per-user
parking lot for retry order) with ONE Redis round trip per round in the common case (the
batch read, consume/batch_reads.py: done-flags, parking flags and the limiter in one
call; a second only for a parked user's items, the lot's admit), runs each user's
head message (circuit breaker decided there), writes done-flags in batches,
dead-letters failures, and reports completions in batches.

Per-user order across DLQ retries (proven by the simulator in tests/sim):
- Only a mailbox HEAD may park its user (every older message has finished): a failure
  parks the user behind it with the queued later messages in front of the lot, BEFORE
  its dead letter (a drained message, which has no record of its own: after it).
- A full mailbox never denies: the overflow is held in the lot behind the newest queued
  message (`hold`, with its Kafka position, so older redelivered records still run).
- Every parking-lot call of a host goes through one lane (an asyncio lock held by the
  whole ingest, by a park and by each drain chunk): Redis applies them in the order the
  host decided them, and no drained message meets a half-ingested copy of itself.
- A park takes the flag over only from its own drain owner or held tail; an older
  blocker (the failing head is then an exempt message) stays.
- A settled blocker (retry succeeded, failed for good, or reviewed: a drain token)
  drains the lot chunk by chunk; before each chunk a new drain token goes to the main
  topic and the records held so far complete, so a drain holds its partition's commit
  for one chunk, and a crash mid-drain resumes from the newest token.
Per-user state (consume/state.py), for a handler declared `@stateful`: loaded when a
mailbox first runs (one round trip for every mailbox activated in the same tick), kept on
the mailbox, dropped with it; each attempt gets a fresh copy; a success's change rides
with its done-flag in one version-checked write, and the message completes only after it.
Lifecycle: active -> dying -> dead after `idle_lifetime_s` without work; a message
arriving while a mailbox is dying goes to a successor that starts only after the old one
is dead. Never: report a completion before the done-flag or dead letter is durable, run
two messages of one user at once, or admit past protection while Redis is down under
policy `stop`. Pure asyncio: no Ray, no Kafka; Redis only behind the seams (DoneStore,
Admission, RetryOrder, DrainTokenSink, BatchReads).

Split by concern: the decisions are pure (host_rules.py: intake, denials, placement, a
head's outcome; mailbox_machine.py: pending ids, mailboxes, park / drain / finish
bookkeeping and lifecycle, events in and commands out); the outside calls and their
retry policies are in host_io.py; this class is the asyncio shell that sequences the
awaits (the lane, workers, durability before completion) and carries out the commands.
Still here, not yet a machine event: the head's run sequence in `_process` / `_settle` /
`_park_behind` / `_drain` (which await follows which outcome).
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
from qywx_ray.consume.host_io import (
    admit_flagged,
    admit_parking,
    batch_read,
    dead_letter,
    durable_dead_letter,
    op_id,
    rate_limit,
    retry_durable,
    run_head,
    with_policy,
)
from qywx_ray.consume.host_rules import (
    Outcome,
    Settle,
    batch_read_plan,
    settle,
    split_denials,
    unrated,
)
from qywx_ray.consume.mailbox import Pending, UserMailbox
from qywx_ray.consume.mailbox_machine import (
    DRAIN_MORE,
    Chunk,
    Finish,
    MailboxMachine,
    Park,
    Start,
)
from qywx_ray.consume.state import (
    DEFAULT_STATE_MAX_BYTES,
    REASON_STATE_TOO_LARGE,
    StateLoader,
    StateSlot,
    StateStore,
    StateTooLarge,
    StateWrite,
    m_state_conflicts,
    m_state_too_large,
    next_write,
    state_spec,
)
from qywx_ray.consume.types import (
    REASON_CIRCUIT_OPEN,
    REASON_INVALID,
    REASON_QUEUE_FULL,
    Admission,
    AllowAll,
    CompletionSink,
    DeadLetter,
    DeadLetterSink,
    Delivery,
    DrainTokenSink,
    HoldRequest,
    ParkRequest,
    RetryOrder,
)
from qywx_ray.envelope import Envelope
from qywx_ray.errors import EnvelopeError
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, gauge, histogram
from qywx_ray.obs.stats import percentiles
from qywx_ray.protect.breaker import CircuitBreaker
from qywx_ray.protect.settings import BreakerSettings

log = get_logger(__name__)

m_processed = counter(
    "qywx_messages_processed_total", "Messages finished by user actors", ["result"]
)
m_failures = counter("qywx_handler_failures_total", "Messages dead-lettered, by reason", ["reason"])
m_seconds = histogram("qywx_processing_seconds", "Handler wall time per message")
m_active = gauge("qywx_active_user_actors", "Live user mailboxes/actors in this host", ["host"])
m_parked = counter("qywx_messages_parked_total", "Messages parked behind a user's retry")
m_unparked = counter("qywx_messages_unparked_total", "Parked messages taken back to process")


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
        # One Redis call per delivery batch for the dedup check, the parking flags and
        # the rate limiter (consume/batch_reads.py); None: the three separate calls.
        self.batch_reads = batch_reads
        self.handler = handler
        self.dedup = dedup
        self.completions = completions
        self.sink = dead_letters
        self.admission: Admission = admission or AllowAll()
        self.retry_order = retry_order
        self.drain_tokens = drain_tokens
        # One lane for every parking-lot call of this host (admit, park, hold, advance):
        # Redis applies them in the order the host decided them, and the mailbox snapshot
        # a park pushes is taken while no admit can be in flight
        # (tests/unit/test_consume_order_defects.py).
        self._lane = asyncio.Lock()
        self.opt = options or CoreOptions()
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
        self._inbox: deque[list[Delivery]] = deque()
        self._inbox_event = asyncio.Event()
        self._ingest_task: asyncio.Task[None] | None = None
        self._ingesting = False
        self._out: dict[str, list[tuple[str, int, int]]] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._ready: asyncio.Queue[UserMailbox] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._ctx_log = make_context_logger()
        self._typed = wants_typed_message(handler)  # else the handler gets the Envelope
        # Per-user state only for a handler that declares it: otherwise no load and no
        # state work in the commit (consume/state.py).
        self._state_spec = state_spec(handler)
        self._states: StateLoader | None = None
        if self._state_spec is not None:
            store = state_store or getattr(dedup, "store", None)
            if store is None or not hasattr(store, "load"):
                raise ValueError("a stateful handler needs a state store")
            self._states = StateLoader(store, self.opt.redis_retry_max_s)
        self._deadlines = HandlerDeadlines(self.opt.handler_timeout_s)
        self.latencies_ms: list[int] = []  # Kafka timestamp -> handler start
        self.arrival_ms: list[int] = []  # Kafka timestamp -> batch reaches this host
        self.counts: dict[str, int] = {
            "processed": 0,
            "duplicate": 0,
            "dead_letter": 0,
            "parked": 0,
            "unparked": 0,
            "admission_bypassed": 0,
        }
        self._published: dict[str, int] = {}
        self._durations_s: list[float] = []

    # ------------------------------------------------------------ intake

    def accept(self, batch: list[Delivery]) -> None:
        """Called in the loop thread: queue a delivery batch for ordered ingest."""
        if batch and len(self.arrival_ms) < self.opt.latency_samples:
            self.arrival_ms.append(self.wall_ms() - batch[0].timestamp_ms)
        self._inbox.append(batch)
        self._inbox_event.set()
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
                    await self._ingest(items)
            except Exception:
                log.error("host.ingest_failed", exc_info=True, host=self.name)
                if self.on_fatal is not None:
                    self.on_fatal("ingest failed")
                raise
            finally:
                self._ingesting = False

    async def _ingest(self, items: list[Delivery]) -> None:  # noqa: C901 - admission for a delivery batch: each branch is one of the machine's verdicts, awaited in order
        parsed: list[tuple[Delivery, Envelope]] = []
        poison: list[DeadLetter] = []
        poison_waiters: list[list[Delivery]] = []
        for d in items:
            try:
                env = Envelope.from_bytes(d.value)
            except EnvelopeError as exc:
                poison.append(dead_letter(d, None, REASON_INVALID, str(exc)))
                poison_waiters.append([d])
                continue
            parsed.append((d, env))
        if poison:
            self._spawn(self._dead_letter_then_complete(poison, poison_waiters))
        ask = self.machine.ids_to_ask(parsed)
        has_lot = self.retry_order is not None
        read = plan = None
        if self.batch_reads is not None and (ask or has_lot):
            # One round trip for done-flags, parking flags and the rate limiter.
            plan = batch_read_plan(parsed, ask, self.dedup.recent, has_lot, self.batch_reads.rates)
            if plan.fits:
                read = await batch_read(
                    self.batch_reads,
                    plan,
                    policy=self.opt.redis_down_policy,
                    retry_max_s=self.opt.redis_retry_max_s,
                    unreachable=self.dedup.unreachable,
                )
        if read is not None:
            done = self.dedup.counted(read.done)
        else:  # no batch read, or it failed under policy process: the separate calls
            done = await self.dedup.already_done(ask) if ask else set()
        # Below, until the next await, pending/recent cannot change under us.
        intake = self.machine.delivered(parsed, done, self.dedup.recent, has_lot)
        self.counts["duplicate"] += intake.duplicates
        for d in intake.complete:
            self._complete(d)
        fresh, resume = intake.fresh, intake.resume
        if not fresh and not resume:
            return
        firsts = [p for p in fresh if not p.delivery.is_retry]  # retries: counted once
        reads = self.batch_reads
        if read is not None and plan is not None and reads is not None and reads.rates:
            reasons = read.reasons
            late = unrated(firsts, plan)  # pending at the plan, failed during the read
            if late:
                reasons.update(await rate_limit(self.admission, late, self._policy))
        else:
            reasons = await rate_limit(self.admission, firsts, self._policy)
        denied, admitted = split_denials(fresh, reasons, self._parks)
        admit: list[Pending] = []
        for p, reason in admitted:
            p.denied = reason  # a parking denial acts at the head, after older messages
            admit.append(p)
        admit.extend(resume)
        if read is not None and has_lot:  # under the lane: the flags read are still current
            codes = await admit_flagged(self.retry_order, admit, read.flagged, self._policy)
        else:
            codes = await admit_parking(self.retry_order, admit, self._policy)  # under the lane
        overflow = self._place(admit, codes, denied)
        for user, (tail, held) in overflow.items():
            hold = functools.partial(self._hold, user, tail, held, op_id())
            await retry_durable("hold", hold, self.opt.redis_retry_max_s)
        if denied:
            for p, _ in denied:
                p.failed = True
            letters = [dead_letter(p.delivery, p.envelope, r, f"denied: {r}") for p, r in denied]
            for _, r in denied:  # dead letters by reason (denials: protect's own counters)
                m_failures.inc(reason=r)
            self._spawn(self._dead_letter_then_finish(letters, [p for p, _ in denied]))

    def _policy(self, what: str, call: Callable[[], Awaitable[Any]], n: int) -> Awaitable[Any]:
        return with_policy(
            what,
            call,
            n,
            policy=self.opt.redis_down_policy,
            retry_max_s=self.opt.redis_retry_max_s,
            bypassed=self._bypassed,
        )

    def _bypassed(self, n: int) -> None:
        self.counts["admission_bypassed"] += n

    def _parks(self, reason: str) -> bool:
        return self.retry_order is not None and self.retry_order.parks(reason)

    def _place(
        self, items: list[Pending], codes: list[int], denied: list[tuple[Pending, str]]
    ) -> dict[str, tuple[Pending, list[Pending]]]:
        """Apply the lot's answers in arrival order, synchronously (under the lane): the
        machine places them (`MailboxMachine.admitted`), this carries out its commands in
        order. Returns the holds to write: user -> (tail, held)."""
        has_lot = self.retry_order is not None
        placed = self.machine.admitted(items, codes, self.opt.mailbox_size, has_lot, self.clock())
        activated: list[UserMailbox] = []
        for c in placed.commands:
            if isinstance(c, Finish):
                self._finish(c.pending, None)  # a plain duplicate or an old token; parked
            elif isinstance(c, Start):
                activated.append(c.mailbox)
                self._start(c.mailbox)
            else:  # Overflow: the mailbox is full
                mb = c.mailbox
                if mb.breaker is not None:
                    mb.breaker.on_failure()
                self.admission.on_failure(mb.user)
                if c.deny is not None:  # no lot to hold it: dead-letter it
                    denied.append((c.deny, REASON_QUEUE_FULL))
        if self._states is not None:
            # Every mailbox this batch activated: its state in one round trip, started
            # now so no handler slot waits for it (a mailbox's future dies with it).
            cold = [mb for mb in activated if mb.user_state is None and mb.state_loading is None]
            if cold:
                loading = self._states.load_now([mb.user for mb in cold])
                for mb in cold:
                    mb.state_loading = loading[mb.user]
        if placed.n_parked:
            self.counts["parked"] += placed.n_parked
            m_parked.inc(placed.n_parked)
        return placed.holds

    async def _hold(self, user: str, tail: Pending, held: list[Pending], op_id: str) -> None:
        assert self.retry_order is not None
        values = [q.delivery.value for q in held]
        position = (tail.delivery.partition, tail.delivery.offset)
        request = HoldRequest(user, tail.envelope.message_id, values, op_id, position)
        await self.retry_order.hold(request)
        self.counts["parked"] += len(held)
        m_parked.inc(len(held))
        for q in held:
            self._finish(q, None)

    async def _park(self, park: Park, op_id: str) -> int:
        assert self.retry_order is not None
        values = [q.delivery.value for q in park.later]
        mid = park.blocker.envelope.message_id
        request = ParkRequest(park.user, mid, park.drop_first, values, op_id, park.replaces)
        return await self.retry_order.park(request)

    # ------------------------------------------------------------ mailboxes

    def _new_breaker(self, user: str) -> CircuitBreaker | None:
        if self.opt.breaker is None:
            return None
        return CircuitBreaker(self.opt.breaker, user=user, clock=self.clock)

    def _start(self, mb: UserMailbox) -> None:
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

    async def _process(self, mb: UserMailbox, p: Pending) -> None:  # noqa: C901 - the head's await sequence (run, settle, park, dead letter); its decisions are mailbox_machine's
        """Run the head of `mb` to a durable outcome. Only the head may park the user: every
        older message of the user has finished, so nothing can overtake it."""
        env = p.envelope
        d = p.delivery
        if p.skip_handler:  # a drain token (or a done retry): drain the lot, run nothing
            await self._drain(mb, p, 0)
            return
        write: StateWrite | None = None
        reason, error = p.denied, f"denied: {p.denied}"
        if reason is None and mb.breaker is not None:
            if mb.breaker.allow():
                mb.breaker.on_success()
            else:
                reason, error = REASON_CIRCUIT_OPEN, "denied: circuit_open"
        if reason is None:
            start_ms = self.wall_ms()
            if d.partition >= 0 and len(self.latencies_ms) < self.opt.latency_samples:
                self.latencies_ms.append(start_ms - d.timestamp_ms)
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
            slot = await self._state_of(mb) if self._states is not None else None
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
                fresh_state=self._fresh_state(slot),
            )
            self._durations_s.append(time.perf_counter() - t0)
            if reason is None and slot is not None:
                write, reason, error = self._state_write(mb, slot, ctx.state)
        step = self.machine.head_finished(p, reason, self._parks)
        if reason is None:
            self.admission.on_success(mb.user)
            self.counts["processed"] += 1
            refused = functools.partial(self._state_refused, mb, env.message_id)
            if step is Outcome.DONE:
                self.dedup.mark_done(env.message_id, lambda: self._finish(p, mb), write, refused)
                return
            # Durable done-flag first: the lot drops a chunk only once every message of it
            # is durably done (flags are written in order), then the parked messages run,
            # in order.
            durable = asyncio.get_running_loop().create_future()
            self.dedup.mark_done(env.message_id, lambda: durable.set_result(None), write, refused)
            await durable
            await self._settle(mb, p)
            return
        if p.denied is None:
            self.admission.on_failure(mb.user)
        m_failures.inc(reason=reason)
        log.warning(
            "handler.failed", user=mb.user, message_id=env.message_id, reason=reason, error=error
        )
        if step is Outcome.PARK_DRAINED or step is Outcome.PARK_RECORDED:
            letter = dead_letter(d, env, reason, error)
            if step is Outcome.PARK_DRAINED:
                # A drained message has no record of its own: its place is in the lot,
                # held by the drain owner's record. Its dead letter is made durable while
                # it is still there, and only then the park drops it from the lot (a crash
                # in between runs it once more from the lot; none loses it). Its retry
                # cannot slip past meanwhile: see Pending.late_retries.
                await self._dead_letter([letter])
                owner = await self._park_behind(mb, p)
            else:  # its own record stays uncommitted until the dead letter is durable
                owner = await self._park_behind(mb, p)
                await self._dead_letter([letter])
            self._finish(p, mb)
            if owner is not None and owner is not p:  # it held the drained p's place
                self._finish(owner, mb)
            return
        # Durable before we move on: the user's next message waits for this dead letter.
        await self._dead_letter([dead_letter(d, env, reason, error)])
        # Waited on: the blocker is settled for good (review), release the user. A chunk's
        # end not retried (e.g. invalid): the rest of the lot goes on.
        await self._settle(mb, p)

    # ------------------------------------------------------------ per-user state

    async def _state_of(self, mb: UserMailbox) -> StateSlot:
        """The mailbox's state: the load its activation started (`_place`: one round trip
        per delivery batch), else loaded now (coalesced with the same tick's asks)."""
        if mb.user_state is None:
            assert self._states is not None
            loading, mb.state_loading = mb.state_loading, None
            if loading is not None:
                mb.user_state = await asyncio.shield(loading)
            else:
                mb.user_state = await self._states.get(mb.user)
        return mb.user_state

    def _fresh_state(self, slot: StateSlot | None) -> Callable[[], Any] | None:
        spec = self._state_spec
        if slot is None or spec is None:
            return None
        return lambda: slot.take(spec)

    def _state_write(
        self, mb: UserMailbox, slot: StateSlot, value: Any
    ) -> tuple[StateWrite | None, str | None, str]:
        """The successful attempt's commit (the slot moves to the new state), or a failure:
        too large (dead letter `state_too_large`, old state kept), or not the declared
        type (`invalid_message`)."""
        assert self._state_spec is not None
        try:
            write = next_write(self._state_spec, slot, mb.user, value, self.opt.state_max_bytes)
        except StateTooLarge as exc:
            m_state_too_large.inc()
            return None, REASON_STATE_TOO_LARGE, str(exc)
        except (TypeError, ValueError) as exc:
            return None, REASON_INVALID, f"ctx.state: {exc}"
        return write, None, ""

    def _state_refused(self, mb: UserMailbox, message_id: str) -> None:
        """The store refused a state commit: another writer moved the user's state, or the
        message was already applied. Nothing of it was written and it is never completed;
        crash-only: the host restarts, the message is re-delivered and re-run against the
        stored state (never a lost update, never a second application)."""
        m_state_conflicts.inc()
        mb.user_state = None
        log.error("state.commit_refused", user=mb.user, message_id=message_id, host=self.name)
        if self.on_fatal is not None:
            self.on_fatal("state commit refused")

    async def _settle(self, mb: UserMailbox, p: Pending) -> None:
        """After the head's durable outcome: release the user, take the next drained
        chunk, or just finish, as `settle` decides from the flags as they are NOW (a hold
        may have made p waited on during the await)."""
        then = settle(waited_on=p.waited_on, chunk_end=p.chunk_end)
        if then is Settle.RELEASE:
            await self._release(mb, p)
            return
        self._finish(p, mb)
        if then is Settle.NEXT_CHUNK:
            await self._drain_next(mb)

    async def _park_behind(self, mb: UserMailbox, p: Pending) -> Pending | None:
        """Park the user behind its head `p` BEFORE p's dead letter is written: the queued
        later messages go, in order, to the front of the lot (minus a drained chunk still
        at the list head). Under the lane: no admit runs meanwhile, so the snapshot is
        the whole queue and everything admitted after it sees the flag. A drained chunk's
        earlier messages that succeeded leave the lot with the drop: their done-flags
        must be durable first."""
        if mb.undropped:
            await self.dedup.flushed()
        async with self._lane:
            park = self.machine.plan_park(mb, p)
            call = functools.partial(self._park, park, op_id())
            status = await retry_durable("park", call, self.opt.redis_retry_max_s)
            out = self.machine.parked(mb, park, status)
            if out.foreign:
                log.warning(
                    "host.park_behind_older_blocker", user=mb.user, message_id=p.envelope.message_id
                )
                return None
            if out.parked:
                self.counts["parked"] += len(out.parked)
                m_parked.inc(len(out.parked))
            for q in out.parked:
                self._finish(q, mb)
        return out.owner

    async def _release(self, mb: UserMailbox, p: Pending) -> None:
        """`p` (maybe the user's blocker) is settled: drain the lot behind it if the user
        waits on it; finish p either way. A drained chunk whose last item was p goes on."""
        continues = self.machine.continues_drain(mb, p)
        await self._drain(mb, p, 0)
        if continues:
            await self._drain_next(mb)

    async def _drain_next(self, mb: UserMailbox) -> None:
        owner = mb.drain_owner
        if owner is not None:
            await self._drain(mb, owner, mb.undropped)

    async def _drain(self, mb: UserMailbox, owner: Pending, drop_n: int) -> None:
        """Feed the next parked messages into the mailbox, right after the current one
        (before anything new); finish `owner` once the lot is empty and the user free.

        While draining, the owner's Kafka record (the retry, then drain tokens) is what a
        crash would redeliver to resume the drain. With a token sink, each chunk first
        puts a fresh token on the main topic and then completes the records held so far:
        the partition's commit is held for one chunk at a time, not the whole drain."""
        while True:
            # Under the lane from the lot's answer until the chunk is registered as
            # pending: an ingest cannot slip a redelivered copy of a chunk message in
            # between (it would be skipped here and parked behind newer ones).
            async with self._lane:
                status, chunk = await self._next_chunk(mb, owner, drop_n)
            if status != DRAIN_MORE:  # 2: drained and unparked; 0: no longer waiting on it
                self.machine.drain_over(mb, owner)
                self._finish(owner, mb)
                if status == 2:
                    log.info("host.unparked", user=mb.user, after=owner.envelope.message_id)
                return
            if not chunk.take:
                drop_n = chunk.n_raw
                continue
            self.counts["unparked"] += len(chunk.take)
            m_unparked.inc(len(chunk.take))
            self.machine.chunk_begins(mb, owner, chunk)
            await self._hand_over_hold(owner)
            self.machine.chunk_runs(mb, chunk)
            return

    async def _next_chunk(self, mb: UserMailbox, owner: Pending, drop_n: int) -> tuple[int, Chunk]:
        """(status, chunk) of one `advance`: drop what the previous chunk consumed, read
        the next, skip what is done or already here (registered as pending before
        returning). The caller holds the lane."""
        assert self.retry_order is not None
        user, mid = mb.user, owner.envelope.message_id
        chunk = self.opt.park_drain_chunk
        advance = functools.partial(self.retry_order.advance, user, mid, drop_n, chunk, op_id())
        status, raw = await retry_durable("advance", advance, self.opt.redis_retry_max_s)
        if status != DRAIN_MORE:
            return status, Chunk([], 0)
        items, unreadable = self.machine.parse_chunk(owner, raw)
        for _ in range(unreadable):
            log.error("host.parked_unreadable", user=user)
        ids = self.machine.ids_to_ask(items)
        done = await self.dedup.already_done(ids) if ids else set()
        return status, self.machine.chunk_read(items, done, self.dedup.recent, len(raw), mb)

    async def _hand_over_hold(self, owner: Pending) -> None:
        """Put a new drain token on the main topic, then complete the records the drain
        held so far (the retry, earlier tokens that came back). Nothing to do while the
        previous token is still on its way: it holds the place."""
        if not self.machine.hand_over(owner, self.drain_tokens is not None):
            return
        assert self.drain_tokens is not None
        env = owner.envelope
        token = functools.partial(
            self.drain_tokens.drain_token, env.external_userid, env.message_id, env.open_kfid
        )
        await retry_durable("drain_token", token, self.opt.redis_retry_max_s, (Exception,))
        for w in self.machine.handed_over(owner):
            self._complete(w)

    def _finish(self, p: Pending, mb: UserMailbox | None) -> None:
        done = self.machine.finish(p, mb, self.clock())
        for w in done.complete:
            self._complete(w)
        if done.reingest:  # a failed attempt's retry is the next attempt: ingest it now
            self.accept(done.reingest)

    # ------------------------------------------------------------ dead letters

    async def _dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        await durable_dead_letter(self.sink, letters, self.name)
        self.counts["dead_letter"] += len(letters)

    async def _dead_letter_then_finish(
        self, letters: Sequence[DeadLetter], items: Sequence[Pending]
    ) -> None:
        await self._dead_letter(letters)
        for p in items:
            self._finish(p, None)

    async def _dead_letter_then_complete(
        self, letters: Sequence[DeadLetter], waiters: Sequence[list[Delivery]]
    ) -> None:
        await self._dead_letter(letters)
        for ws in waiters:
            for w in ws:
                self._complete(w)

    # ------------------------------------------------------------ completions

    def _complete(self, d: Delivery) -> None:
        self._out.setdefault(d.consumer, []).append(d.tpo)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.opt.completion_flush_ms / 1000.0)
        self.flush_completions()

    def flush_metrics(self) -> None:
        """Metrics leave the hot path: counted locally, published with each completion flush."""
        for result in ("processed", "duplicate", "dead_letter"):
            delta = self.counts[result] - self._published.get(result, 0)
            if delta:
                m_processed.inc(delta, result={"processed": "ok"}.get(result, result))
                self._published[result] = self.counts[result]
        durations, self._durations_s = self._durations_s, []
        for d in durations:
            m_seconds.observe(d)
        m_active.set(len(self.mailboxes), host=self.name)

    def flush_completions(self) -> None:
        self.flush_metrics()
        out, self._out = self._out, {}
        for consumer, done in out.items():
            try:
                self.completions.complete(consumer, done)
            except Exception as exc:  # noqa: BLE001 - the consumer re-delivers what it never heard about
                log.warning("host.completion_lost", consumer=consumer, n=len(done), error=str(exc))

    @property
    def completions_pending(self) -> int:
        return sum(len(v) for v in self._out.values())

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
            and self.completions_pending == 0
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
        def pct(xs: list[int], q: float) -> float | None:
            return percentiles(xs, (q,))[q] if xs else None

        xs = sorted(self.latencies_ms)
        arrivals = sorted(self.arrival_ms)
        if reset:
            self.latencies_ms = []
            self.arrival_ms = []
        return {
            "n": len(xs),
            "p50_ms": pct(xs, 50),
            "p99_ms": pct(xs, 99),
            "max_ms": xs[-1] if xs else None,
            "arrival_p50_ms": pct(arrivals, 50),
            "arrival_p99_ms": pct(arrivals, 99),
        }

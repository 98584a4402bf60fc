"""A host's intake: one delivery batch, from bytes to placed mailbox work, in order.

For each batch, under the host's lane (host_lot.py): parse (poison -> dead letter), ask
which ids are already done, rate-limit each first delivery at its send time, ask the
parking lot whether each user is parked, then place: start mailboxes, hold a full
mailbox's overflow in the lot, dead-letter denials. In the common case that is ONE
Redis round trip (consume/batch_reads.py: done-flags, parking flags and the limiter in
one call); a second only for a parked user's items (the lot's admit). The decisions are
pure (host_rules.py, mailbox_machine.py); this module sequences the awaits and carries
out the machine's commands.

Under policy `stop` a Redis outage holds the batch (retried with backoff: nothing is
admitted past protection and nothing commits); under `process` protection is bypassed
and counted (`admission_bypassed`). See host_io.py for each call's failure policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from qywx_ray.consume.batch_reads import BatchAnswer, BatchReads
from qywx_ray.consume.dedup import Deduplicator
from qywx_ray.consume.host_io import (
    admit_flagged,
    admit_parking,
    batch_read,
    dead_letter,
    rate_limit,
    with_policy,
)
from qywx_ray.consume.host_lot import Finishes, LotSteps
from qywx_ray.consume.host_report import HostReport, m_failures
from qywx_ray.consume.host_rules import BatchReadPlan, batch_read_plan, split_denials, unrated
from qywx_ray.consume.host_state import HostStates
from qywx_ray.consume.mailbox import Pending, UserMailbox
from qywx_ray.consume.mailbox_machine import Finish, MailboxMachine, Start
from qywx_ray.consume.types import (
    REASON_INVALID,
    REASON_QUEUE_FULL,
    Admission,
    DeadLetter,
    Delivery,
)
from qywx_ray.envelope import Envelope
from qywx_ray.errors import EnvelopeError


class IntakeHost(Finishes, Protocol):
    """What intake hands back to the host: mailboxes to run, letters to write."""

    def start(self, mb: UserMailbox) -> None: ...

    def dead_letter_later(
        self,
        letters: Sequence[DeadLetter],
        finish: Sequence[Pending] = (),
        complete: Sequence[Delivery] = (),
    ) -> None: ...


class Intake:
    """Admission of a host's delivery batches (the caller holds the lane)."""

    def __init__(
        self,
        *,
        machine: MailboxMachine,
        dedup: Deduplicator,
        admission: Admission,
        batch_reads: BatchReads | None,
        lot: LotSteps,
        states: HostStates | None,
        report: HostReport,
        host: IntakeHost,
        mailbox_size: int,
        redis_down_policy: str,
        retry_max_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.machine = machine
        self.dedup = dedup
        self.admission = admission
        self.batch_reads = batch_reads
        self.lot = lot
        self.has_lot = lot.lot is not None
        self.states = states
        self.report = report
        self.host = host
        self.mailbox_size = mailbox_size
        self.redis_down_policy = redis_down_policy
        self.retry_max_s = retry_max_s
        self.clock = clock

    async def ingest(self, items: list[Delivery]) -> None:
        parsed = self._parse(items)
        ask = self.machine.ids_to_ask(parsed)
        plan, read = await self._read(parsed, ask)
        if read is not None:
            done = self.dedup.counted(read.done)
        else:  # no batch read, or it failed under policy process: the separate calls
            done = await self.dedup.already_done(ask) if ask else set()
        # Below, until the next await, pending/recent cannot change under us.
        intake = self.machine.delivered(parsed, done, self.dedup.recent, self.has_lot)
        self.report.counts["duplicate"] += intake.duplicates
        for d in intake.complete:
            self.host.complete(d)
        if intake.fresh or intake.resume:
            await self._admit(intake.fresh, intake.resume, plan, read)

    def _parse(self, items: list[Delivery]) -> list[tuple[Delivery, Envelope]]:
        """The batch's envelopes; an unreadable record is dead-lettered (then completed)."""
        parsed: list[tuple[Delivery, Envelope]] = []
        poison: list[DeadLetter] = []
        poisoned: list[Delivery] = []
        for d in items:
            try:
                env = Envelope.from_bytes(d.value)
            except EnvelopeError as exc:
                poison.append(dead_letter(d, None, REASON_INVALID, str(exc)))
                poisoned.append(d)
                continue
            parsed.append((d, env))
        if poison:
            self.host.dead_letter_later(poison, complete=poisoned)
        return parsed

    async def _read(
        self, parsed: list[tuple[Delivery, Envelope]], ask: list[str]
    ) -> tuple[BatchReadPlan | None, BatchAnswer | None]:
        """One round trip for done-flags, parking flags and the rate limiter, when it
        fits; (None, None): ask separately."""
        reads = self.batch_reads
        if reads is None or not (ask or self.has_lot):
            return None, None
        plan = batch_read_plan(parsed, ask, self.dedup.recent, self.has_lot, reads.rates)
        if not plan.fits:
            return plan, None
        read = await batch_read(
            reads,
            plan,
            policy=self.redis_down_policy,
            retry_max_s=self.retry_max_s,
            unreachable=self.dedup.unreachable,
        )
        return plan, read

    async def _admit(
        self,
        fresh: list[Pending],
        resume: list[Pending],
        plan: BatchReadPlan | None,
        read: BatchAnswer | None,
    ) -> None:
        """Rate limit, the lot's verdict, placement; then holds and denials."""
        firsts = [p for p in fresh if not p.delivery.is_retry]  # retries: counted once
        reads = self.batch_reads
        if read is not None and plan is not None and reads is not None and reads.rates:
            reasons = read.reasons
            late = unrated(firsts, plan)  # pending at the plan, failed during the read
            if late:
                reasons.update(await rate_limit(self.admission, late, self._policy))
        else:
            reasons = await rate_limit(self.admission, firsts, self._policy)
        denied, admitted = split_denials(fresh, reasons, self.lot.parks)
        admit: list[Pending] = []
        for p, reason in admitted:
            p.denied = reason  # a parking denial acts at the head, after older messages
            admit.append(p)
        admit.extend(resume)
        order = self.lot.lot
        if read is not None and self.has_lot:  # under the lane: the flags read are still current
            codes = await admit_flagged(order, admit, read.flagged, self._policy)
        else:
            codes = await admit_parking(order, admit, self._policy)  # under the lane
        for user, (tail, held) in self._place(admit, codes, denied).items():
            await self.lot.hold(user, tail, held)
        if denied:
            for p, _ in denied:
                p.failed = True
            letters = [dead_letter(p.delivery, p.envelope, r, f"denied: {r}") for p, r in denied]
            for _, r in denied:  # dead letters by reason (denials: protect's own counters)
                m_failures.inc(reason=r)
            self.host.dead_letter_later(letters, finish=[p for p, _ in denied])

    def _policy(self, what: str, call: Callable[[], Awaitable[Any]], n: int) -> Awaitable[Any]:
        return with_policy(
            what,
            call,
            n,
            policy=self.redis_down_policy,
            retry_max_s=self.retry_max_s,
            bypassed=self._bypassed,
        )

    def _bypassed(self, n: int) -> None:
        self.report.counts["admission_bypassed"] += n

    def _place(
        self, items: list[Pending], codes: list[int], denied: list[tuple[Pending, str]]
    ) -> dict[str, tuple[Pending, list[Pending]]]:
        """Apply the lot's answers in arrival order, synchronously (under the lane): the
        machine places them (`MailboxMachine.admitted`), this carries out its commands in
        order. Returns the holds to write: user -> (tail, held)."""
        placed = self.machine.admitted(items, codes, self.mailbox_size, self.has_lot, self.clock())
        activated: list[UserMailbox] = []
        for c in placed.commands:
            if isinstance(c, Finish):
                self.host.finish(c.pending, None)  # a plain duplicate or an old token; parked
            elif isinstance(c, Start):
                activated.append(c.mailbox)
                self.host.start(c.mailbox)
            else:  # Overflow: the mailbox is full
                mb = c.mailbox
                if mb.breaker is not None:
                    mb.breaker.on_failure()
                self.admission.on_failure(mb.user)
                if c.deny is not None:  # no lot to hold it: dead-letter it
                    denied.append((c.deny, REASON_QUEUE_FULL))
        if self.states is not None:
            self.states.activated(activated)
        if placed.n_parked:
            self.lot.report_parked(placed.n_parked)
        return placed.holds

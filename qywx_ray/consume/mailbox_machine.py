"""The per-user mailboxes' park / drain / finish bookkeeping, as a pure state machine.

Events in, commands out, like the partition consumer's tracker (tracker.py): HostCore
(user_actor.py) does the awaits (the parking lot, the done-store, drain tokens, the
handler) and reports each outcome here as an event; the answer says what to do next.
Nothing here awaits, reads a clock (callers pass `now_s`), talks to Redis, Kafka or Ray,
or creates a task, so every step of the protocol is a unit test
(tests/unit/test_consume_mailbox_machine.py) and the simulator (tests/sim) drives it
through the real HostCore.

State: `pending` (one `Pending` per message id in this host, from ingest until its
outcome is durable), `mailboxes` (the live mailbox of each user, ACTIVE or DYING) and
each `UserMailbox`'s queue, its drain (`drain_owner`: the settled blocker whose lot is
being fed in; `undropped`: items of the last chunk still at the head of the lot), its
scheduling flags and lifecycle.

Events: `delivered` (an ingest round sorted against the done-store), `admitted` (the
lot's codes for the admitted messages), `head_done`/`next_turn` (a head's run is over),
`plan_park`/`parked` (a head parks its user; the lot answered), `chunk_read` /
`chunk_begins` / `hand_over` / `handed_over` / `chunk_runs` / `drain_over` (one drain
step each), `finish` (an outcome is durable), `expire`/`died` (idle lifecycle).
Commands: `Finish` (finish this message), `Start` (schedule this mailbox: it got its
first work), `Overflow` (a full mailbox: count a failure; maybe dead-letter queue_full),
`Park`, holds to write, deliveries to complete or ingest again.

The rules it keeps (the simulator in tests/sim checks them):
- finishing a message completes every delivery of its id, except a DLQ retry that came
  during a failed attempt: that one is the next attempt and is ingested afresh;
- only the head parks its user; the park's snapshot is the whole queue behind the head
  (taken while no admit is in flight: the caller holds the lane), and it takes the flag
  over only from its own drain owner or a held tail;
- a chunk drained from the lot skips ids done or already here, runs right after the
  current head (before anything newer), and its last item takes the next chunk;
- before a chunk runs, a fresh drain token holds the drain's place, and only then the
  records held so far complete: a drain pins its partition's commit for one chunk.
Never: finish a message twice, complete a late retry of an attempt that failed, or
change the queue of a mailbox whose head is not the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from qywx_ray.consume.host_rules import (
    Intake,
    Outcome,
    Place,
    after_handler,
    plan_placement,
    sort_intake,
)
from qywx_ray.consume.mailbox import Pending, State, UserMailbox
from qywx_ray.consume.types import PARK_FOREIGN, Delivery
from qywx_ray.envelope import Envelope
from qywx_ray.errors import EnvelopeError
from qywx_ray.protect.breaker import CircuitBreaker

DRAIN_MORE = 1  # `advance` status: here is the next chunk (others: 0 not waiting, 2 unparked)


class Finish(NamedTuple):
    """Command: finish `pending` now (a duplicate or token with nothing to drain, or a
    message durably parked behind its user's blocker)."""

    pending: Pending


class Start(NamedTuple):
    """Command: `mailbox` got its first work: put it on the ready line, once its
    predecessor (a dying mailbox of the same user) is dead."""

    mailbox: UserMailbox


class Overflow(NamedTuple):
    """Command: `mailbox` is full: count a failure against the user (breaker, admission).
    `deny`: no lot to hold it in, dead-letter it as queue_full."""

    mailbox: UserMailbox
    deny: Pending | None


class Placed(NamedTuple):
    """Outcome of `admitted`: `commands` in arrival order, then the `holds` to write
    (user -> (tail, held), in the order the holds began); `n_parked` counted."""

    commands: list[Finish | Start | Overflow]
    holds: dict[str, tuple[Pending, list[Pending]]]
    n_parked: int


class Finished(NamedTuple):
    """Commands of `finish`: report `complete` (in order), then ingest `reingest` afresh."""

    complete: list[Delivery]
    reingest: list[Delivery]


@dataclass(frozen=True)
class Park:
    """Command: park `user` behind `blocker` in the lot (one idempotent write, `op_id` given
    by the caller): drop the first `drop_first` items (a drained chunk's, now settled),
    push `later`'s values to the front, take the flag over from `replaces` only."""

    user: str
    blocker: Pending
    drop_first: int
    later: list[Pending]
    replaces: list[str]
    owner: Pending | None  # the drain owner whose chunk `blocker` came from, if any


class Parked(NamedTuple):
    """Outcome of a park: `finish` these (durably behind the blocker now, in order), then
    the drain `owner` whose place the blocker held (None: nothing more)."""

    foreign: bool  # an older blocker holds the flag: nothing changed
    parked: list[Pending]
    owner: Pending | None


class Chunk(NamedTuple):
    """Outcome of reading a chunk: `take` runs next (already registered as pending)."""

    take: list[Pending]
    n_raw: int  # items read from the lot (dropped by the next `advance`)


class MailboxMachine:
    """Pending ids and the park/drain bookkeeping of a host's mailboxes (no IO)."""

    def __init__(
        self, new_breaker: Callable[[str], CircuitBreaker | None] = lambda user: None
    ) -> None:
        self.pending: dict[str, Pending] = {}
        self.mailboxes: dict[str, UserMailbox] = {}
        self._new_breaker = new_breaker  # a user's circuit breaker (it reads its own clock)

    # ------------------------------------------------------------ intake

    def delivered(
        self,
        parsed: Sequence[tuple[Delivery, Envelope]],
        done: Container[str],
        recent: Container[str],
        has_lot: bool,
    ) -> Intake:
        """An ingest round's parsed deliveries, with the done-store's answer for the ids
        not here (`ids_to_ask`): new ids are registered as pending, copies of ids here
        wait with them (or aside: late retries), as `sort_intake` decides. The caller
        completes `complete`, counts `duplicates`, and rate-limits and admits `fresh` and
        `resume`."""
        intake = sort_intake(parsed, self.pending, done, recent, has_lot)
        for p in intake.register:
            self.pending[p.envelope.message_id] = p
        for p, d in intake.waiters:
            p.waiters.append(d)
        for p, d in intake.late_retries:
            p.late_retries.append(d)
        return intake

    def mailbox_for(self, user: str, now_s: float) -> UserMailbox:
        """The user's ACTIVE mailbox; a new one if there is none (a dying one becomes its
        predecessor: the new one starts only after it is dead)."""
        mb = self.mailboxes.get(user)
        if mb is not None and mb.state is State.ACTIVE:
            return mb
        predecessor = mb if mb is not None and mb.state is State.DYING else None
        new = UserMailbox(user, predecessor, now_s, self._new_breaker(user))
        self.mailboxes[user] = new
        return new

    def admitted(
        self,
        items: Sequence[Pending],
        codes: Sequence[int],
        mailbox_size: int,
        has_lot: bool,
        now_s: float,
    ) -> Placed:
        """The lot's answers for `items`, applied in arrival order as `plan_placement`
        decides (call under the lane): parked ones are durably behind the user's blocker;
        the rest join their mailbox, or a full mailbox's hold (its tail is then waited on
        and holding)."""
        queues: dict[str, Sequence[Pending]] = {}
        for p in items:
            user = p.envelope.external_userid
            mb = self.mailboxes.get(user)
            if mb is not None and mb.state is State.ACTIVE:
                queues[user] = mb.queue
        plan = plan_placement(items, codes, queues, mailbox_size, has_lot)
        commands: list[Finish | Start | Overflow] = []
        for step in plan.steps:
            p, kind = step.pending, step.kind
            if kind is Place.FINISH or kind is Place.PARKED:
                commands.append(Finish(p))
                continue
            if kind is Place.JOIN_HOLD:  # already in plan.holds
                continue
            p.waited_on = step.waited_on
            mb = self.mailbox_for(step.user, now_s)
            if kind is Place.OFFER:
                mb.queue.append(p)
                mb.unfinished += 1
                if not mb.scheduled:
                    mb.scheduled = True
                    commands.append(Start(mb))
                continue
            if kind is Place.DENY_FULL:  # no lot to hold it: dead-letter it
                commands.append(Overflow(mb, p))
                continue
            commands.append(Overflow(mb, None))
            tail = step.tail
            assert tail is not None, "plan drifted"
            assert mb.queue, "plan drifted"
            assert mb.queue[-1] is tail, "plan drifted"
            tail.waited_on = tail.holds = True
        return Placed(commands, plan.holds, plan.n_parked)

    # ------------------------------------------------------------ finishing

    def finish(self, p: Pending, mb: UserMailbox | None, now_s: float) -> Finished:
        """`p`'s outcome is durable (or it is durably parked, or a duplicate): forget its
        id; its deliveries complete. A late retry completes with a success only: after a
        failure it is the next attempt (see Pending.late_retries)."""
        self.pending.pop(p.envelope.message_id, None)
        complete = list(p.waiters)
        reingest: list[Delivery] = []
        if p.late_retries:
            if p.failed:
                reingest = p.late_retries
            else:
                complete.extend(p.late_retries)
        if mb is not None:
            mb.unfinished -= 1
            mb.last_active_s = now_s
        return Finished(complete, reingest)

    # ------------------------------------------------------------ lifecycle

    def expire(self, now_s: float, idle_lifetime_s: float) -> list[UserMailbox]:
        """Mailboxes idle (nothing queued, unfinished or scheduled) for `idle_lifetime_s`
        start dying; the caller ends each (on_dying) and then reports `died`."""
        expired = []
        for mb in list(self.mailboxes.values()):
            if (
                mb.state is State.ACTIVE
                and not mb.queue
                and mb.unfinished == 0
                and not mb.scheduled
                and now_s - mb.last_active_s >= idle_lifetime_s
            ):
                mb.state = State.DYING
                expired.append(mb)
        return expired

    def died(self, mb: UserMailbox) -> None:
        """`mb` is dead: forget it (unless a successor already took its place)."""
        mb.state = State.DEAD
        if self.mailboxes.get(mb.user) is mb:
            del self.mailboxes[mb.user]

    # ------------------------------------------------------------ running the head

    @staticmethod
    def head_done(mb: UserMailbox, now_s: float) -> None:
        """The head's run is over (whatever its outcome, even a bug's exception): it
        leaves the queue; the user may run its next message."""
        mb.queue.popleft()
        mb.busy = False
        mb.last_active_s = now_s
        mb.processed += 1

    @staticmethod
    def head_finished(p: Pending, reason: str | None, parks: Callable[[str], bool]) -> Outcome:
        """The head's handler finished (`reason` None: success; else its failure reason,
        or the denial it was held for): record it on `p` (a late retry completes with a
        success only) and say which path its outcome takes (`after_handler`)."""
        if reason is None:
            p.succeeded = True
        else:
            p.failed = True
        return after_handler(
            reason,
            parks,
            waited_on=p.waited_on,
            chunk_end=p.chunk_end,
            drained=p.delivery.partition < 0,
        )

    @staticmethod
    def next_turn(mb: UserMailbox) -> bool:
        """After `head_done`: True if the user has more to run (round robin: it goes to the
        back of the ready line), else it is no longer scheduled (one message at a time)."""
        if mb.queue:
            return True
        mb.scheduled = False
        return False

    # ------------------------------------------------------------ parking

    @staticmethod
    def plan_park(mb: UserMailbox, blocker: Pending) -> Park:
        """The park of the user behind its head `blocker` (call under the lane: the queue
        is then the whole snapshot of what was admitted behind it).

        The flags this park may take over: its drain owner's, or a newer queued plain
        message's (a full mailbox held behind its tail). Any other blocker is older than
        `blocker` (which is then an exempt message, e.g. a rate-limited retry): the park
        leaves the flag, the lot and this queue as they are."""
        later = list(mb.queue)[1:]
        owner = mb.drain_owner
        replaces = [q.envelope.message_id for q in later if q.holds or not q.delivery.is_retry]
        if owner is not None:
            replaces.append(owner.envelope.message_id)
        return Park(mb.user, blocker, mb.undropped, later, replaces, owner)

    @staticmethod
    def parked(mb: UserMailbox, park: Park, status: int) -> Parked:
        """The lot answered the park. Foreign: an older blocker stays, nothing changes.
        Else the queued later messages are durably behind the blocker: they leave the
        queue (the caller finishes them), and the drain (if any) is over."""
        assert len(mb.queue) == 1 + len(park.later), "the queue changed under the lane"
        if status == PARK_FOREIGN:
            return Parked(True, [], None)
        while len(mb.queue) > 1:
            mb.queue.pop()
        mb.undropped, mb.drain_owner = 0, None
        return Parked(False, park.later, park.owner)

    # ------------------------------------------------------------ draining

    @staticmethod
    def continues_drain(mb: UserMailbox, p: Pending) -> bool:
        """`p` is settled and was the last of a drained chunk of another owner: once its
        own drain (if any) is over, the owner's drain goes on."""
        return p.chunk_end and mb.drain_owner is not None and mb.drain_owner is not p

    @staticmethod
    def parse_chunk(
        owner: Pending, raw: Sequence[bytes]
    ) -> tuple[list[tuple[Delivery, Envelope]], int]:
        """The lot's values as deliveries without a Kafka record of their own (partition
        -1: the owner's record holds their place). Returns (items, unreadable count): a
        value that does not parse is skipped rather than blocking the user (never parked
        unparsed)."""
        items: list[tuple[Delivery, Envelope]] = []
        bad = 0
        for value in raw:
            try:
                env = Envelope.from_bytes(value)
            except EnvelopeError:
                bad += 1
                continue
            d = owner.delivery._replace(
                partition=-1,
                offset=-1,
                value=value,
                msg_id=env.message_id,
                retry_count=0,
                is_retry=False,
                is_drain=False,
            )
            items.append((d, env))
        return items, bad

    def ids_to_ask(self, items: Sequence[tuple[Delivery, Envelope]]) -> list[str]:
        """The chunk's ids the done-store must be asked about (not already here)."""
        return [e.message_id for _, e in items if e.message_id not in self.pending]

    def chunk_read(
        self,
        items: Sequence[tuple[Delivery, Envelope]],
        done: Container[str],
        recent: Container[str],
        n_raw: int,
        mb: UserMailbox | None = None,
    ) -> Chunk:
        """The chunk's messages to run: not done (durably or recently here), not already
        here, and only the first copy of an id the lot holds twice (a re-pulled copy parked
        behind the original). They are registered as pending at once (call under the lane:
        no ingest may slip a redelivered copy in between).

        A copy of a chunk message that already waits in `mb`'s queue (not the head: e.g.
        the message's own DLQ retry, admitted while the lot was waiting on another one,
        after a crash left the failed message at the front of the lot) joins the chunk at
        the message's place: the chunk's later messages must not run before it."""
        take: list[Pending] = []
        for d, e in items:
            item_id = e.message_id
            if item_id in done or item_id in recent:
                continue
            here = self.pending.get(item_id)
            if here is not None:
                joins = mb is not None and not here.skip_handler and _queued_behind_head(mb, here)
                if joins and not any(t is here for t in take):
                    take.append(here)
                continue
            q = Pending(d, e, [])
            self.pending[item_id] = q
            take.append(q)
        return Chunk(take, n_raw)

    @staticmethod
    def drain_over(mb: UserMailbox, owner: Pending) -> None:
        """The lot is empty and the user unparked (or no longer waiting on `owner`): the
        drain is over; the caller finishes `owner`."""
        if mb.drain_owner is owner:
            mb.drain_owner, mb.undropped = None, 0

    @staticmethod
    def chunk_begins(mb: UserMailbox, owner: Pending, chunk: Chunk) -> None:
        """A non-empty chunk will run: its last item takes the next chunk; the drain
        remembers what to drop next."""
        chunk.take[-1].chunk_end = True
        mb.drain_owner, mb.undropped = owner, chunk.n_raw
        owner.draining = True

    @staticmethod
    def hand_over(owner: Pending, has_tokens: bool) -> bool:
        """Before a chunk runs: True if a fresh drain token must go to the main topic
        first (then `handed_over`). Copies that came during the owner's attempt wait with
        it now (it is settled). Nothing to hand over while the previous token is still on
        its way: it holds the place."""
        if owner.late_retries:
            owner.waiters.extend(owner.late_retries)
            owner.late_retries = []
        return has_tokens and bool(owner.waiters)

    @staticmethod
    def handed_over(owner: Pending) -> list[Delivery]:
        """The new drain token is durable: the records held so far complete."""
        held, owner.waiters = owner.waiters, []
        return held

    @staticmethod
    def chunk_runs(mb: UserMailbox, chunk: Chunk) -> None:
        """The chunk goes right after the current head, before anything newer."""
        for i, q in enumerate(chunk.take):
            at = next((j for j, x in enumerate(mb.queue) if x is q), None)
            if at is not None:  # a copy already queued here: moved to its place
                del mb.queue[at]
            else:
                mb.unfinished += 1
            mb.queue.insert(1 + i, q)


def _queued_behind_head(mb: UserMailbox, p: Pending) -> bool:
    """`p` waits in `mb`'s queue and is not its head (identity: Pendings compare by value)."""
    return any(x is p for i, x in enumerate(mb.queue) if i > 0)

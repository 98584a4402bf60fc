"""The decisions `HostCore` makes synchronously, as pure functions: plain data in, a plan out.

HostCore (user_actor.py) keeps the IO and the awaits; it asks these functions what to do
with a delivery batch and applies the answer step by step, in the order given. Nothing
here awaits, talks to Redis/Kafka/Ray, or mutates its inputs: every function can be
unit-tested with plain values (tests/unit/test_consume_host_rules.py) and the order
rules they encode are stated where they are decided:

- `sort_intake`: one id is one `Pending` per host. A copy of an id already here waits
  with it (completed with it), except a DLQ retry of an attempt that may still fail: that
  one is kept aside (`late_retries`) so a failure ingests it afresh instead of completing
  it. A done message's retry, and any drain token, still has to release its user's
  parking lot, so it becomes a handler-less `Pending` (resume) when there is a lot.
- `batch_read_plan`: what the one Redis call per delivery batch asks (done-flags, the
  users' parking flags, the rate limiter for the messages that will be first deliveries)
  before `sort_intake` knows which are fresh: the store skips a rated message whose
  done-flag it finds, so what it rates is exactly `sort_intake`'s fresh first deliveries.
- `split_denials`: a rate-limit denial that parks is acted on at the mailbox head, after
  the user's older messages (only the head may park); one that does not park is
  dead-lettered at once (it is exempt from order anyway).
- `plan_placement`: the lot's admit codes applied in arrival order. A full mailbox never
  denies when there is a lot: its overflow is held in the lot behind the mailbox's tail
  (so no denial's retry overtakes older queued messages), later plain messages of that
  user join the hold, and retries and drain tokens still enter (one may be the key to
  the user's lot: held behind itself it would wait forever).
- `after_handler` / `settle`: which path a head takes after its handler. Only the head
  parks (its older messages have finished); a drained message's dead letter is durable
  before the park drops it from the lot, a recorded one's after the park. What follows a
  durable outcome is decided only after that await, from the flags as they are then (a
  hold may have made the head waited on meanwhile).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from qywx_ray.consume.mailbox import Pending
from qywx_ray.consume.types import PARKED, WAITED_ON, Delivery
from qywx_ray.envelope import Envelope

# ------------------------------------------------------------------ intake


@dataclass
class Intake:
    """What an ingest round does with its parsed deliveries (lists in arrival order)."""

    register: list[Pending] = field(default_factory=list)  # new ids: add to `pending`
    fresh: list[Pending] = field(default_factory=list)  # to run: rate limit, then the lot
    resume: list[Pending] = field(default_factory=list)  # handler-less: tokens, done retries
    waiters: list[tuple[Pending, Delivery]] = field(default_factory=list)  # wait with it
    late_retries: list[tuple[Pending, Delivery]] = field(default_factory=list)  # kept aside
    complete: list[Delivery] = field(default_factory=list)  # nothing to do: report done
    duplicates: int = 0  # already done here or durably (counted as "duplicate")


def sort_intake(
    parsed: Sequence[tuple[Delivery, Envelope]],
    pending: Mapping[str, Pending],
    done: Container[str],
    recent: Container[str],
    has_lot: bool,
) -> Intake:
    """Sort one ingest round's parsed deliveries.

    `pending`: the host's ids in flight; `done`: ids the done-store reported done (asked
    only for ids not pending); `recent`: the host's recent-done cache; `has_lot`: the
    host has a parking lot (RetryOrder). A Pending created for an id earlier in the same
    round counts as pending for its later copies. The inputs are not modified: the
    caller registers `register`, appends `waiters` / `late_retries` to their Pending,
    completes `complete` and counts `duplicates`.
    """
    out = Intake()
    added: dict[str, Pending] = {}
    for d, env in parsed:
        mid = env.message_id
        p = pending.get(mid)
        if p is None:
            p = added.get(mid)
        if p is not None:  # a re-delivery (or a drain token) of a message still here
            # A retry or token for a message whose attempt here may still fail is kept
            # aside (see Pending.late_retries); once it succeeded (or it is a drain), any
            # copy just waits with it (a drain hands them over per chunk).
            settled = p.skip_handler or p.succeeded or p.draining
            if d.is_retry and not settled:
                out.late_retries.append((p, d))
            else:
                out.waiters.append((p, d))
            continue
        if d.is_drain:
            if not has_lot:
                out.complete.append(d)
                continue
            p = Pending(d, env, [d], skip_handler=True)
            added[mid] = p
            out.register.append(p)
            out.resume.append(p)
            continue
        if mid in done or mid in recent:
            out.duplicates += 1
            # With a lot, any done copy may be its user's blocker: a retry, or a hold's
            # tail whose host died after the done-flag and before the advance. It asks
            # the lot as a token (WAITED_ON: drain; else it just completes).
            if has_lot:
                p = Pending(d, env, [d], skip_handler=True)
                added[mid] = p
                out.register.append(p)
                out.resume.append(p)
            else:
                out.complete.append(d)
            continue
        p = Pending(d, env, [d])
        added[mid] = p
        out.register.append(p)
        out.fresh.append(p)
    return out


# Above this many keys a batch read is not made (the separate calls chunk their keys).
BATCH_READ_MAX_KEYS = 5000


class RateItem(NamedTuple):
    """One message the batch read rates: `done_at` is the 1-based index of its id in
    `BatchReadPlan.ask` (the store skips it when that done-flag exists)."""

    message_id: str
    user: str
    time_s: float
    done_at: int


@dataclass
class BatchReadPlan:
    """What one batch read asks the store. `ask`: ids whose done-flags to read (the
    machine's ids not known done here); `known`: ids of the machine's asked ids the
    recent-done cache answers; `users`: users whose parking flag to read (none without a
    lot); `rate`: messages to rate, per user in arrival order (empty unless `rates`)."""

    ask: list[str] = field(default_factory=list)
    known: set[str] = field(default_factory=set)
    users: list[str] = field(default_factory=list)
    rate: list[RateItem] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        """Whether one call can carry it (else the separate, chunked calls are made)."""
        return len(self.ask) + len(self.users) <= BATCH_READ_MAX_KEYS


def batch_read_plan(
    parsed: Sequence[tuple[Delivery, Envelope]],
    ask: Sequence[str],
    recent: Container[str],
    has_lot: bool,
    rates: bool,
) -> BatchReadPlan:
    """The batch read for one ingest round, decided before its await.

    `ask`: the machine's ids to ask (`MailboxMachine.ids_to_ask`: not pending here);
    `recent`: the recent-done cache; `has_lot`: read the users' parking flags; `rates`:
    the store also runs the rate limiter. A message is rated when `sort_intake` would make
    it a fresh first delivery, given the done-flags read in the same call: not a retry or
    drain token, asked (not pending), not recently done, the first copy of its id here.
    Its done-flag index goes with it so the store skips it when that flag exists. A
    pending id that leaves `pending` during the await (it failed meanwhile) becomes fresh
    unrated: the caller rates such stragglers separately (`unrated`).
    """
    plan = BatchReadPlan()
    index: dict[str, int] = {}
    for mid in ask:
        if mid in recent:
            plan.known.add(mid)
        elif mid not in index:
            plan.ask.append(mid)
            index[mid] = len(plan.ask)
    if has_lot:
        plan.users = list(dict.fromkeys(env.external_userid for _, env in parsed))
    if rates:
        seen: set[str] = set()
        for d, env in parsed:
            mid = env.message_id
            if d.is_drain and not has_lot:
                continue  # completed at once, not registered: a later copy may be fresh
            if mid in seen:
                continue
            seen.add(mid)
            if d.is_retry or d.is_drain or mid not in index:
                continue
            t = float(env.send_time or d.timestamp_ms / 1000.0)
            plan.rate.append(RateItem(mid, env.external_userid, t, index[mid]))
    return plan


def unrated(firsts: Sequence[Pending], plan: BatchReadPlan) -> list[Pending]:
    """The fresh first deliveries the batch read did not rate (see `batch_read_plan`)."""
    rated = {r.message_id for r in plan.rate}
    return [p for p in firsts if p.envelope.message_id not in rated]


def split_denials(
    fresh: Sequence[Pending], reasons: Mapping[str, str], parks: Callable[[str], bool]
) -> tuple[list[tuple[Pending, str]], list[tuple[Pending, str | None]]]:
    """(dead-letter now, admit) from the rate limiter's denial reasons by message id.

    A denial whose reason does not park is exempt from order: it is dead-lettered at
    once. Every other message is admitted with its reason (None, or a parking denial the
    head acts on after the user's older messages: `Pending.denied`), in arrival order.
    """
    denied: list[tuple[Pending, str]] = []
    admit: list[tuple[Pending, str | None]] = []
    for p in fresh:
        reason = reasons.get(p.envelope.message_id)
        if reason is not None and not parks(reason):
            denied.append((p, reason))
            continue
        admit.append((p, reason))
    return denied, admit


# ------------------------------------------------------------------ placement


class Place(enum.Enum):
    """What placement does with one admitted message."""

    FINISH = "finish"  # handler-less and not waited on: a duplicate, or a token for a drain over
    PARKED = "parked"  # durably behind its user's blocker: its offset counts as processed
    JOIN_HOLD = "join_hold"  # its user's full mailbox already holds overflow: held behind it
    OFFER = "offer"  # into its user's mailbox
    HOLD = "hold"  # the mailbox is full: held in the lot behind the mailbox's tail
    DENY_FULL = "deny_full"  # the mailbox is full and there is no lot: dead letter queue_full


@dataclass(frozen=True)
class Placing:
    """One step of a placement. For OFFER, HOLD and DENY_FULL the caller first sets
    `pending.waited_on = waited_on` and gets (creates) the user's mailbox; HOLD and
    DENY_FULL count a breaker and admission failure; HOLD marks `tail` waited on and
    holding."""

    kind: Place
    pending: Pending
    waited_on: bool = False
    tail: Pending | None = None  # HOLD: the mailbox's newest queued message

    @property
    def user(self) -> str:
        return self.pending.envelope.external_userid


@dataclass
class PlacePlan:
    steps: list[Placing] = field(default_factory=list)  # one per item, in arrival order
    holds: dict[str, tuple[Pending, list[Pending]]] = field(default_factory=dict)  # user ->
    # (tail, held): the lot writes to make after placing, in the order the holds began
    n_parked: int = 0

    def of(self, kind: Place) -> list[Pending]:
        return [s.pending for s in self.steps if s.kind is kind]

    def offers(self) -> dict[str, list[Pending]]:
        """Messages offered per user, in order (for tests and traces)."""
        out: dict[str, list[Pending]] = {}
        for s in self.steps:
            if s.kind is Place.OFFER:
                out.setdefault(s.user, []).append(s.pending)
        return out


def plan_placement(
    items: Sequence[Pending],
    codes: Sequence[int],
    queues: Mapping[str, Sequence[Pending]],
    mailbox_size: int,
    has_lot: bool,
) -> PlacePlan:
    """Apply the lot's admit `codes` to `items` in arrival order.

    `queues`: the queue of each user's ACTIVE mailbox (a user missing here gets a new,
    empty one). Queue lengths and tails are tracked as the plan offers, exactly as the
    mailboxes change while the caller applies it.

    Why: only a message the user waits on (WAITED_ON, or any retry: under policy process
    the lot may not have been able to say so) drains the lot after it; a handler-less
    message that is not waited on has nothing to drain and finishes at once. A full
    mailbox holds its overflow behind its tail instead of denying it, so no denial's
    retry overtakes older queued messages; the user's later plain messages join that
    hold (they must stay behind it), while retries and drain tokens always enter the
    mailbox (one may be the key to the lot). Without a lot there is nothing to hold: a
    full mailbox's overflow is dead-lettered as queue_full.
    """
    plan = PlacePlan()
    length: dict[str, int] = {}
    tails: dict[str, Pending | None] = {}
    for p, code in zip(items, codes, strict=True):
        user = p.envelope.external_userid
        if p.skip_handler and code != WAITED_ON:
            plan.steps.append(Placing(Place.FINISH, p))
            continue
        if code == PARKED:
            plan.n_parked += 1
            plan.steps.append(Placing(Place.PARKED, p))
            continue
        is_retry = p.delivery.is_retry
        held = plan.holds.get(user)
        if held is not None and not is_retry:
            held[1].append(p)
            plan.steps.append(Placing(Place.JOIN_HOLD, p))
            continue
        waited_on = has_lot and (code == WAITED_ON or is_retry)
        if user not in length:
            queue = queues.get(user, ())
            length[user] = len(queue)
            tails[user] = queue[-1] if queue else None
        if length[user] >= mailbox_size and not is_retry:
            if not has_lot:
                plan.steps.append(Placing(Place.DENY_FULL, p, waited_on))
                continue
            tail = tails[user]
            assert tail is not None, "a full mailbox has a tail (mailbox_size >= 1)"
            plan.holds[user] = (tail, [p])
            plan.steps.append(Placing(Place.HOLD, p, waited_on, tail))
            continue
        length[user] += 1
        tails[user] = p
        plan.steps.append(Placing(Place.OFFER, p, waited_on))
    return plan


# ------------------------------------------------------------------ outcome


class Outcome(enum.Enum):
    """The path a head message takes once its handler ran (or was denied at the head)."""

    DONE = "done"  # success, nothing waits on it: done-flag in the background, then finish
    DONE_THEN_SETTLE = "done_then_settle"  # success, waited on or a chunk's end: `settle`
    # after its done-flag is durable (the lot drops a chunk only once it is all done)
    PARK_DRAINED = "park_drained"  # parking failure of a drained message (no record of
    # its own: its place is in the lot): dead letter durable first, then the park
    PARK_RECORDED = "park_recorded"  # parking failure with its own uncommitted record:
    # park first (later messages must not overtake its retry), then the dead letter
    DEAD_THEN_SETTLE = "dead_then_settle"  # not parking: durable dead letter, then `settle`


def after_handler(
    reason: str | None,
    parks: Callable[[str], bool],
    *,
    waited_on: bool,
    chunk_end: bool,
    drained: bool,
) -> Outcome:
    """Which path the head takes: `reason` None = success, else its failure reason;
    `parks(reason)`: the failure parks the user (asked only on failure); `drained`: the
    message came out of the lot (no Kafka record of its own).

    Only the head may park its user: every older message has finished, so its later
    messages (queued, then the lot) stay behind it and its retry.
    """
    if reason is None:
        return Outcome.DONE_THEN_SETTLE if waited_on or chunk_end else Outcome.DONE
    if parks(reason):
        return Outcome.PARK_DRAINED if drained else Outcome.PARK_RECORDED
    return Outcome.DEAD_THEN_SETTLE


class Settle(enum.Enum):
    RELEASE = "release"  # the user waits on it: drain the lot behind it (finishes it)
    NEXT_CHUNK = "next_chunk"  # last of a drained chunk: finish it, take the next chunk
    FINISH = "finish"


def settle(*, waited_on: bool, chunk_end: bool) -> Settle:
    """What follows a head's durable outcome (done-flag or a non-parking dead letter).

    Decided only after that await, with the flags as they are then: while the outcome
    was being made durable, a full mailbox may have made this head (its tail) the one
    its overflow is held behind (`waited_on`), and then it must drain that hold.
    """
    if waited_on:
        return Settle.RELEASE
    return Settle.NEXT_CHUNK if chunk_end else Settle.FINISH

"""The park / drain / finish bookkeeping (consume/mailbox_machine.py) driven event by event
on plain values: no asyncio loop, no Redis, no HostCore."""

from __future__ import annotations

import pytest

from qywx_ray.consume.host_rules import Outcome
from qywx_ray.consume.mailbox import Pending, State, UserMailbox
from qywx_ray.consume.mailbox_machine import Finish, MailboxMachine, Overflow, Start
from qywx_ray.consume.types import ADMITTED, PARK_FOREIGN, PARKED, Delivery
from qywx_ray.envelope import Envelope

_offset = [0]


def envelope(mid: str, user: str = "u1") -> Envelope:
    return Envelope(message_id=mid, open_kfid="kf", external_userid=user, msgtype="text")


def delivery(mid: str, user: str = "u1", *, retry: bool = False) -> Delivery:
    _offset[0] += 1
    value = envelope(mid, user).to_bytes()
    return Delivery("t", 0, _offset[0], 1_000, user, value, mid, "c0", int(retry), retry)


def pending(m: MailboxMachine, mid: str, user: str = "u1", *, retry: bool = False) -> Pending:
    d = delivery(mid, user, retry=retry)
    p = Pending(d, envelope(mid, user), [d])
    m.pending[mid] = p
    return p


def mailbox(*queued: Pending) -> UserMailbox:
    mb = UserMailbox("u1", None, 0.0)
    for p in queued:
        mb.queue.append(p)
        mb.unfinished += 1
    mb.scheduled = True
    return mb


# ------------------------------------------------------------------ finish


def test_finish_completes_every_copy_and_forgets_the_id() -> None:
    m = MailboxMachine()
    p = pending(m, "m0")
    again = delivery("m0")
    p.waiters.append(again)
    mb = mailbox(p)
    out = m.finish(p, mb, now_s=5.0)
    assert out.complete == [p.delivery, again]
    assert out.reingest == []
    assert "m0" not in m.pending
    assert mb.unfinished == 0
    assert mb.last_active_s == 5.0


def test_a_late_retry_completes_with_a_success_only() -> None:
    m = MailboxMachine()
    ok = pending(m, "m0")
    ok.late_retries.append(late := delivery("m0", retry=True))
    assert m.finish(ok, None, 0.0).complete == [ok.delivery, late]

    failed = pending(m, "m1")
    failed.failed = True
    failed.late_retries.append(late := delivery("m1", retry=True))
    out = m.finish(failed, None, 0.0)
    assert out.complete == [failed.delivery]  # never completed with a failure
    assert out.reingest == [late]  # it is the next attempt


# ------------------------------------------------------------------ the head's turn


def test_head_done_then_next_turn_round_robin() -> None:
    m = MailboxMachine()
    a, b = pending(m, "m0"), pending(m, "m1")
    mb = mailbox(a, b)
    mb.busy = True
    m.head_done(mb, 3.0)
    assert list(mb.queue) == [b]
    assert not mb.busy
    assert mb.processed == 1
    assert m.next_turn(mb)
    assert mb.scheduled
    m.head_done(mb, 4.0)
    assert not m.next_turn(mb)
    assert not mb.scheduled


# ------------------------------------------------------------------ parking


def test_park_snapshot_is_the_whole_queue_behind_the_head() -> None:
    m = MailboxMachine()
    head, q1, r2, q3 = (
        pending(m, "m0"),
        pending(m, "m1"),
        pending(m, "r2", retry=True),
        pending(m, "m3"),
    )
    mb = mailbox(head, q1, r2, q3)
    park = m.plan_park(mb, head)
    assert park.user == "u1"
    assert park.blocker is head
    assert park.drop_first == 0
    assert park.later == [q1, r2, q3]
    # plain messages may hold the flag (a held tail); a queued retry is some older
    # blocker's: never taken over
    assert park.replaces == ["m1", "m3"]
    assert park.owner is None
    r2.holds = True  # a retry that a full mailbox's overflow is held behind: replaceable
    assert m.plan_park(mb, head).replaces == ["m1", "r2", "m3"]


def test_park_acknowledged_empties_the_queue_behind_the_head_and_ends_the_drain() -> None:
    m = MailboxMachine()
    owner = pending(m, "r0", retry=True)
    head, q1 = pending(m, "m1"), pending(m, "m2")
    mb = mailbox(head, q1)
    mb.drain_owner, mb.undropped = owner, 4
    park = m.plan_park(mb, head)
    assert park.drop_first == 4
    assert park.replaces == ["m2", "r0"]
    assert park.owner is owner
    out = m.parked(mb, park, status=1)
    assert not out.foreign
    assert out.parked == [q1]
    assert out.owner is owner
    assert list(mb.queue) == [head]
    assert mb.drain_owner is None
    assert mb.undropped == 0


def test_a_foreign_park_changes_nothing() -> None:
    m = MailboxMachine()
    head, q1 = pending(m, "m1"), pending(m, "m2")
    mb = mailbox(head, q1)
    out = m.parked(mb, m.plan_park(mb, head), PARK_FOREIGN)
    assert out.foreign
    assert out.parked == []
    assert out.owner is None
    assert list(mb.queue) == [head, q1]


def test_a_queue_that_changed_under_the_lane_is_a_bug() -> None:
    m = MailboxMachine()
    head = pending(m, "m1")
    mb = mailbox(head)
    park = m.plan_park(mb, head)
    mb.queue.append(pending(m, "m2"))  # an admit slipped in: the lane was not held
    with pytest.raises(AssertionError, match="changed under the lane"):
        m.parked(mb, park, 1)


# ------------------------------------------------------------------ draining


def test_a_chunk_skips_done_present_and_doubled_ids_and_runs_after_the_head() -> None:
    m = MailboxMachine()
    owner = pending(m, "r0", retry=True)
    here = pending(m, "m2")  # a redelivered copy already in flight here
    raw = [envelope(x).to_bytes() for x in ("m1", "m2", "m3", "m4", "m4", "m5")]
    raw.insert(2, b"not json")
    items, bad = m.parse_chunk(owner, raw)
    assert bad == 1
    assert [e.message_id for _, e in items] == ["m1", "m2", "m3", "m4", "m4", "m5"]
    assert all(d.partition == -1 and not d.is_retry for d, _ in items)  # no record of its own
    assert m.ids_to_ask(items) == ["m1", "m3", "m4", "m4", "m5"]
    chunk = m.chunk_read(items, done={"m3"}, recent={"m5"}, n_raw=len(raw))
    assert [q.envelope.message_id for q in chunk.take] == ["m1", "m4"]
    assert chunk.n_raw == 7
    assert {"m1", "m4"} <= m.pending.keys()

    mb = mailbox(owner, here)
    m.chunk_begins(mb, owner, chunk)
    assert chunk.take[-1].chunk_end
    assert not chunk.take[0].chunk_end
    assert mb.drain_owner is owner
    assert mb.undropped == 7
    assert owner.draining
    m.chunk_runs(mb, chunk)
    assert [q.envelope.message_id for q in mb.queue] == ["r0", "m1", "m4", "m2"]
    assert mb.unfinished == 4


def test_a_copy_queued_behind_the_head_joins_the_chunk_at_its_place() -> None:
    """A crash left failed m2 at the front of the lot; its DLQ retry was admitted and
    queued behind the resumed drain's owner. The chunk [m2, m3] must run m2 (the queued
    retry, moved) before m3, not m3 first (sim seed 1630)."""
    m = MailboxMachine()
    owner = pending(m, "r0", retry=True)
    retry = pending(m, "m2", retry=True)
    mb = mailbox(owner, retry)
    items, _ = m.parse_chunk(owner, [envelope(x).to_bytes() for x in ("m2", "m3")])
    chunk = m.chunk_read(items, done=set(), recent=set(), n_raw=2, mb=mb)
    assert [q.envelope.message_id for q in chunk.take] == ["m2", "m3"]
    assert chunk.take[0] is retry  # the queued copy itself, not a second one
    m.chunk_begins(mb, owner, chunk)
    m.chunk_runs(mb, chunk)
    assert [q.envelope.message_id for q in mb.queue] == ["r0", "m2", "m3"]
    assert mb.unfinished == 3  # the moved copy is counted once


def test_hand_over_puts_a_token_only_when_records_are_held() -> None:
    m = MailboxMachine()
    owner = pending(m, "r0", retry=True)
    late = delivery("r0", retry=True)
    owner.late_retries.append(late)
    assert not m.hand_over(owner, has_tokens=False)  # no token sink: the retry holds it
    assert owner.waiters == [owner.delivery, late]
    assert owner.late_retries == []
    assert m.hand_over(owner, has_tokens=True)
    assert m.handed_over(owner) == [owner.delivery, late]
    assert owner.waiters == []
    # the token (not yet back) holds the place: nothing to hand over for the next chunk
    assert not m.hand_over(owner, has_tokens=True)


def test_drain_over_and_continues() -> None:
    m = MailboxMachine()
    owner, other = pending(m, "r0", retry=True), pending(m, "r9", retry=True)
    item = pending(m, "m1")
    mb = mailbox(item)
    mb.drain_owner, mb.undropped = owner, 3
    item.chunk_end = True
    assert m.continues_drain(mb, item)
    assert not m.continues_drain(mb, owner)  # its own drain: nothing to continue
    m.drain_over(mb, other)  # not the drain's owner: the drain goes on
    assert mb.drain_owner is owner
    assert mb.undropped == 3
    m.drain_over(mb, owner)
    assert mb.drain_owner is None
    assert mb.undropped == 0
    assert not m.continues_drain(mb, item)


# ------------------------------------------------------------------ intake and placement


def test_delivered_registers_new_ids_and_sets_copies_aside() -> None:
    m = MailboxMachine()
    running = pending(m, "m0")
    copy, late = delivery("m0"), delivery("m0", retry=True)
    fresh = delivery("m1")
    parsed = [(d, envelope(d.msg_id)) for d in (copy, late, fresh)]
    assert m.ids_to_ask(parsed) == ["m1"]
    intake = m.delivered(parsed, done=set(), recent=set(), has_lot=True)
    assert running.waiters == [running.delivery, copy]
    assert running.late_retries == [late]  # the attempt may still fail
    assert [p.envelope.message_id for p in intake.fresh] == ["m1"]
    assert "m1" in m.pending


def test_admitted_offers_starts_once_parks_and_holds_a_full_mailbox() -> None:
    m = MailboxMachine()
    a0, a1, a2, a3 = (pending(m, f"m{i}") for i in range(4))
    placed = m.admitted([a0, a1, a2, a3], [ADMITTED, ADMITTED, ADMITTED, PARKED], 2, True, 7.0)
    mb = m.mailboxes["u1"]
    assert list(mb.queue) == [a0, a1]
    assert mb.scheduled
    assert mb.unfinished == 2
    kinds = [type(c) for c in placed.commands]
    assert kinds == [Start, Overflow, Finish]  # one start; a2 held; a3 durably parked
    over = placed.commands[1]
    assert isinstance(over, Overflow)
    assert over.deny is None
    assert over.mailbox is mb
    assert placed.holds == {"u1": (a1, [a2])}
    assert a1.waited_on
    assert a1.holds
    assert placed.n_parked == 1


def test_admitted_without_a_lot_denies_the_overflow() -> None:
    m = MailboxMachine()
    a0, a1 = pending(m, "m0"), pending(m, "m1")
    placed = m.admitted([a0, a1], [ADMITTED, ADMITTED], 1, False, 0.0)
    over = placed.commands[1]
    assert isinstance(over, Overflow)
    assert over.deny is a1
    assert placed.holds == {}


def test_expire_and_died_keep_a_successor() -> None:
    m = MailboxMachine()
    p = pending(m, "m0")
    m.admitted([p], [ADMITTED], 10, False, now_s=0.0)
    old = m.mailboxes["u1"]
    assert m.expire(now_s=100.0, idle_lifetime_s=10.0) == []  # still has work
    m.head_done(old, 1.0)
    assert not m.next_turn(old)
    old.unfinished = 0
    assert m.expire(now_s=5.0, idle_lifetime_s=10.0) == []  # not idle long enough
    assert m.expire(now_s=11.0, idle_lifetime_s=10.0) == [old]
    assert old.state is State.DYING
    q = pending(m, "m1")
    placed = m.admitted([q], [ADMITTED], 10, False, now_s=12.0)
    new = m.mailboxes["u1"]
    assert new is not old
    assert new.predecessor is old
    assert placed.commands == [Start(new)]
    m.died(old)
    assert old.state is State.DEAD
    assert m.mailboxes["u1"] is new


def test_head_finished_records_the_outcome_and_picks_the_path() -> None:
    m = MailboxMachine()
    parks = {"retryable"}.__contains__
    ok = pending(m, "m0")
    assert m.head_finished(ok, None, parks) is Outcome.DONE
    assert ok.succeeded
    assert not ok.failed
    waited = pending(m, "m1")
    waited.waited_on = True
    assert m.head_finished(waited, None, parks) is Outcome.DONE_THEN_SETTLE
    failed = pending(m, "m2")
    assert m.head_finished(failed, "retryable", parks) is Outcome.PARK_RECORDED
    assert failed.failed
    drained = Pending(failed.delivery._replace(partition=-1, offset=-1), envelope("m3"), [])
    assert m.head_finished(drained, "retryable", parks) is Outcome.PARK_DRAINED
    assert m.head_finished(pending(m, "m4"), "invalid", parks) is Outcome.DEAD_THEN_SETTLE

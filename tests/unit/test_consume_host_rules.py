"""HostCore's synchronous decisions (consume/host_rules.py) on plain values: no asyncio,
no Redis, no mailboxes."""

from __future__ import annotations

from qywx_ray.consume.host_rules import (
    Outcome,
    Place,
    Settle,
    after_handler,
    plan_placement,
    settle,
    sort_intake,
    split_denials,
)
from qywx_ray.consume.mailbox import Pending
from qywx_ray.consume.types import ADMITTED, PARKED, WAITED_ON, Delivery
from qywx_ray.envelope import Envelope

_offsets: dict[int, int] = {}


def delivery(
    mid: str,
    user: str = "u1",
    *,
    retry: bool = False,
    drain: bool = False,
    partition: int = 0,
) -> Delivery:
    offset = _offsets[partition] = _offsets.get(partition, -1) + 1
    return Delivery(
        topic="t",
        partition=partition,
        offset=offset,
        timestamp_ms=1_000,
        key=user,
        value=mid.encode(),
        msg_id=mid,
        consumer="c0",
        retry_count=1 if retry else 0,
        is_retry=retry or drain,  # a drain token carries retry_from_dlq too
        is_drain=drain,
    )


def envelope(mid: str, user: str = "u1") -> Envelope:
    return Envelope(message_id=mid, open_kfid="kf", external_userid=user, msgtype="text")


def parsed(d: Delivery) -> tuple[Delivery, Envelope]:
    return d, envelope(d.msg_id, d.key)


def pending(mid: str, user: str = "u1", *, retry: bool = False, skip: bool = False) -> Pending:
    d = delivery(mid, user, retry=retry)
    return Pending(d, envelope(mid, user), [d], skip_handler=skip)


# ------------------------------------------------------------------ sort_intake


def test_fresh_messages_are_registered_in_order() -> None:
    a, b = delivery("a"), delivery("b", "u2")
    plan = sort_intake([parsed(a), parsed(b)], {}, set(), set(), has_lot=True)
    assert [p.envelope.message_id for p in plan.fresh] == ["a", "b"]
    assert plan.register == plan.fresh
    assert plan.fresh[0].waiters == [a]
    assert not plan.fresh[0].skip_handler
    assert not plan.resume
    assert not plan.complete
    assert plan.duplicates == 0


def test_duplicate_retry_with_a_lot_resumes_without_the_handler() -> None:
    r = delivery("a", retry=True)
    plan = sort_intake([parsed(r)], {}, {"a"}, set(), has_lot=True)
    assert plan.duplicates == 1
    assert not plan.fresh
    assert not plan.complete
    [p] = plan.resume
    assert p.skip_handler
    assert p.waiters == [r]
    assert plan.register == [p]


def test_duplicate_retry_without_a_lot_completes() -> None:
    r = delivery("a", retry=True)
    no_lot = sort_intake([parsed(r)], {}, {"a"}, set(), has_lot=False)
    assert no_lot.complete == [r]
    assert not no_lot.resume
    assert no_lot.duplicates == 1


def test_drain_token_without_a_lot_completes_and_with_one_resumes() -> None:
    t = delivery("a", drain=True)
    no_lot = sort_intake([parsed(t)], {}, set(), set(), has_lot=False)
    assert no_lot.complete == [t]
    assert not no_lot.register
    assert no_lot.duplicates == 0
    lot = sort_intake([parsed(t)], {}, set(), set(), has_lot=True)
    [p] = lot.resume
    assert p.skip_handler
    assert not lot.complete
    assert lot.duplicates == 0


def test_retry_for_an_unsettled_pending_is_a_late_retry() -> None:
    here = pending("a")
    r = delivery("a", retry=True)
    plan = sort_intake([parsed(r)], {"a": here}, set(), set(), has_lot=True)
    assert plan.late_retries == [(here, r)]
    assert not plan.waiters
    assert not plan.register
    assert not plan.complete
    assert here.late_retries == []  # inputs are not modified


def test_copies_of_a_settled_pending_wait_with_it() -> None:
    plain = delivery("a")
    for flag in ("succeeded", "draining", "skip_handler"):
        here = pending("a")
        setattr(here, flag, True)
        r = delivery("a", retry=True)
        plan = sort_intake([parsed(r), parsed(plain)], {"a": here}, set(), set(), True)
        assert plan.waiters == [(here, r), (here, plain)], flag
        assert not plan.late_retries


def test_plain_copy_of_an_unsettled_pending_waits() -> None:
    here = pending("a")
    d = delivery("a")
    plan = sort_intake([parsed(d)], {"a": here}, set(), set(), has_lot=True)
    assert plan.waiters == [(here, d)]
    assert not plan.late_retries


def test_copies_in_one_round_attach_to_the_first() -> None:
    first, copy, retry = delivery("a"), delivery("a"), delivery("a", retry=True)
    plan = sort_intake([parsed(first), parsed(copy), parsed(retry)], {}, {"a"}, set(), True)
    # "a" is done: the first copy asks the lot as a token (its user may be parked behind
    # it); the later copies wait with it.
    [p] = plan.resume
    assert p.delivery == first
    assert p.skip_handler
    assert plan.duplicates == 1
    assert plan.waiters == [(p, copy), (p, retry)]
    assert not plan.complete

    plan = sort_intake([parsed(first), parsed(copy), parsed(retry)], {}, set(), set(), True)
    [p] = plan.fresh
    assert plan.waiters == [(p, copy)]
    assert plan.late_retries == [(p, retry)]


def test_a_done_plain_copy_asks_the_lot_it_may_be_a_holds_blocker() -> None:
    """A hold parks a full mailbox's overflow behind the newest queued message (a plain
    record). If the host dies after that message's done-flag and before its advance,
    the redelivered copy is the only thing that can release the user: it must reach
    the lot as a token, not complete as a duplicate (simulator seed 101759 after the
    admit became two steps: the user stayed parked, nine messages never ran)."""
    d = delivery("a")
    plan = sort_intake([parsed(d)], {}, {"a"}, set(), has_lot=True)
    [p] = plan.resume
    assert p.skip_handler
    assert plan.register == [p]
    assert not plan.complete
    plan = sort_intake([parsed(d)], {}, set(), {"a"}, has_lot=True)  # recent-done cache
    assert [q.delivery for q in plan.resume] == [d]
    plan = sort_intake([parsed(d)], {}, {"a"}, set(), has_lot=False)  # no lot: complete
    assert plan.complete == [d]
    assert not plan.resume


def test_a_token_pending_takes_a_second_token_as_waiter() -> None:
    t1, t2 = delivery("a", drain=True), delivery("a", drain=True)
    plan = sort_intake([parsed(t1), parsed(t2)], {}, set(), set(), has_lot=True)
    [p] = plan.resume
    assert plan.waiters == [(p, t2)]


def test_split_denials_dead_letters_only_non_parking_reasons() -> None:
    a, b, c = pending("a"), pending("b"), pending("c")
    reasons = {"a": "rate_limited", "b": "circuit_open"}
    denied, admit = split_denials([a, b, c], reasons, lambda r: r != "rate_limited")
    assert denied == [(a, "rate_limited")]
    assert admit == [(b, "circuit_open"), (c, None)]
    assert a.denied is None
    assert b.denied is None


# ------------------------------------------------------------------ plan_placement


def test_offers_in_order_and_tracks_queue_growth() -> None:
    a, b, c = pending("a"), pending("b"), pending("c", "u2")
    plan = plan_placement([a, b, c], [ADMITTED] * 3, {}, mailbox_size=5, has_lot=True)
    assert [s.kind for s in plan.steps] == [Place.OFFER] * 3
    assert plan.offers() == {"u1": [a, b], "u2": [c]}
    assert not plan.holds
    assert plan.n_parked == 0


def test_full_mailbox_holds_behind_its_tail_and_later_plain_messages_join() -> None:
    q1, q2 = pending("q1"), pending("q2")
    a, b, r, c = pending("a"), pending("b"), pending("r", retry=True), pending("c")
    items = [a, b, r, c]
    plan = plan_placement(items, [ADMITTED] * 4, {"u1": [q1, q2]}, mailbox_size=2, has_lot=True)
    assert [s.kind for s in plan.steps] == [
        Place.HOLD,
        Place.JOIN_HOLD,
        Place.OFFER,  # a retry still enters the full mailbox
        Place.JOIN_HOLD,
    ]
    assert plan.holds == {"u1": (q2, [a, b, c])}
    assert plan.steps[0].tail is q2
    assert plan.offers() == {"u1": [r]}
    assert plan.steps[2].waited_on  # a retry may be the blocker: it drains after success


def test_mailbox_fills_within_the_batch_and_holds_behind_the_new_tail() -> None:
    q1 = pending("q1")
    a, b, c = pending("a"), pending("b"), pending("c")
    plan = plan_placement([a, b, c], [ADMITTED] * 3, {"u1": [q1]}, mailbox_size=2, has_lot=True)
    assert [s.kind for s in plan.steps] == [Place.OFFER, Place.HOLD, Place.JOIN_HOLD]
    assert plan.holds == {"u1": (a, [b, c])}


def test_full_mailbox_without_a_lot_denies_queue_full_each_time() -> None:
    q1 = pending("q1")
    a, b, other = pending("a"), pending("b"), pending("o", "u2")
    plan = plan_placement(
        [a, b, other], [ADMITTED] * 3, {"u1": [q1]}, mailbox_size=1, has_lot=False
    )
    assert [s.kind for s in plan.steps] == [Place.DENY_FULL, Place.DENY_FULL, Place.OFFER]
    assert plan.of(Place.DENY_FULL) == [a, b]
    assert not plan.holds
    assert not any(s.waited_on for s in plan.steps)  # no lot: nothing is waited on


def test_parked_ones_finish_and_are_counted() -> None:
    a, b, c = pending("a"), pending("b"), pending("c")
    plan = plan_placement([a, b, c], [PARKED, ADMITTED, PARKED], {}, 5, has_lot=True)
    assert [s.kind for s in plan.steps] == [Place.PARKED, Place.OFFER, Place.PARKED]
    assert plan.n_parked == 2
    assert plan.offers() == {"u1": [b]}


def test_handler_less_message_not_waited_on_finishes() -> None:
    token = pending("t", retry=True, skip=True)
    for code in (ADMITTED, PARKED):
        plan = plan_placement([token], [code], {}, 5, has_lot=True)
        assert [s.kind for s in plan.steps] == [Place.FINISH]
        assert plan.n_parked == 0


def test_waited_on_token_enters_a_full_mailbox_and_is_waited_on() -> None:
    q1 = pending("q1")
    token = pending("t", retry=True, skip=True)
    plan = plan_placement([token], [WAITED_ON], {"u1": [q1]}, mailbox_size=1, has_lot=True)
    [step] = plan.steps
    assert step.kind is Place.OFFER
    assert step.waited_on


def test_waited_on_follows_the_code_or_a_retry_only_with_a_lot() -> None:
    a, r, w = pending("a"), pending("r", retry=True), pending("w")
    plan = plan_placement([a, r, w], [ADMITTED, ADMITTED, WAITED_ON], {}, 5, has_lot=True)
    assert [s.waited_on for s in plan.steps] == [False, True, True]
    plan = plan_placement([a, r, w], [ADMITTED, ADMITTED, WAITED_ON], {}, 5, has_lot=False)
    assert [s.waited_on for s in plan.steps] == [False, False, False]


def test_plan_leaves_its_inputs_alone() -> None:
    q1 = pending("q1")
    queue = [q1]
    a, b = pending("a"), pending("b")
    plan_placement([a, b], [ADMITTED, ADMITTED], {"u1": queue}, mailbox_size=1, has_lot=True)
    assert queue == [q1]
    assert not q1.waited_on
    assert not q1.holds
    assert not a.waited_on


# ------------------------------------------------------------------ outcome


def _parks(reason: str) -> bool:
    return reason != "invalid_message"


def test_success_outcomes() -> None:
    def ok(waited_on: bool, chunk_end: bool) -> Outcome:
        return after_handler(None, _parks, waited_on=waited_on, chunk_end=chunk_end, drained=True)

    assert ok(False, False) is Outcome.DONE
    assert ok(True, False) is Outcome.DONE_THEN_SETTLE
    assert ok(False, True) is Outcome.DONE_THEN_SETTLE


def test_parks_is_asked_only_on_failure() -> None:
    def boom(reason: str) -> bool:
        raise AssertionError(reason)

    assert after_handler(None, boom, waited_on=True, chunk_end=False, drained=False) is (
        Outcome.DONE_THEN_SETTLE
    )


def test_parking_failure_of_a_drained_vs_a_recorded_message() -> None:
    def fail(drained: bool, waited_on: bool = False) -> Outcome:
        return after_handler(
            "downstream_error", _parks, waited_on=waited_on, chunk_end=True, drained=drained
        )

    assert fail(drained=True) is Outcome.PARK_DRAINED
    assert fail(drained=False) is Outcome.PARK_RECORDED
    assert fail(drained=False, waited_on=True) is Outcome.PARK_RECORDED  # parks again


def test_non_parking_failure_dead_letters_then_settles() -> None:
    for drained in (False, True):
        got = after_handler(
            "invalid_message", _parks, waited_on=False, chunk_end=False, drained=drained
        )
        assert got is Outcome.DEAD_THEN_SETTLE


def test_settle() -> None:
    assert settle(waited_on=True, chunk_end=True) is Settle.RELEASE
    assert settle(waited_on=True, chunk_end=False) is Settle.RELEASE
    assert settle(waited_on=False, chunk_end=True) is Settle.NEXT_CHUNK
    assert settle(waited_on=False, chunk_end=False) is Settle.FINISH

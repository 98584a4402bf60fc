"""ConsumerTracker: the partition consumer's decisions, without Kafka, Ray, threads or clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qywx_ray.consume.tracker import (
    READY,
    RECOVERING,
    Call,
    ConsumerTracker,
    Send,
)
from qywx_ray.consume.types import Delivery

T = "main"
P0 = (T, 0)
P1 = (T, 1)
HOST = "host-0"


def rec(partition: int, offset: int, user: str = "u1") -> Delivery:
    return Delivery(T, partition, offset, 0, user, b"", f"m{offset}", "c#1")


def to_host(user: str) -> str:
    return HOST


def ready(tr: ConsumerTracker, key: str = HOST, inc: str = "i1", now: float = 0.0) -> Send | None:
    """Drive `key` through a recovery to READY with incarnation `inc`."""
    calls = [c for c in tr.due(now).recover if c.key == key]
    assert calls, f"no recovery call for {key}"
    return tr.recovered(key, calls[0].epoch, inc, now)


def offsets(send: Send) -> list[int]:
    return [d.offset for d in send.deliveries]


# ------------------------------------------------------------ ownership


def test_record_of_an_unowned_partition_is_dropped_and_its_completion_commits_nothing() -> None:
    """Issue 15 item 3: a record polled before the revoke ran must not be tracked, and a
    completion for it must neither create a watermark nor produce a commit."""
    tr = ConsumerTracker()
    tr.assigned([P0])
    fetched = tr.serial
    tr.revoking([P0])
    tr.revoked([P0])
    out = tr.polled([rec(0, 5)], to_host, 0.0, fetched)
    assert out.sends == []
    assert out.accepted == 0
    assert out.dropped == 1
    assert tr.inflight == 0
    assert tr.targets == {}
    assert tr.completed([(T, 0, 5)]) == 0
    assert tr.commit_now(1.0) == {}
    assert tr.committed() == {}


def test_record_fetched_before_a_reassign_is_stale() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    before = tr.serial
    tr.revoking([P0])
    tr.revoked([P0])
    tr.assigned([P0])
    after = tr.serial
    assert tr.polled([rec(0, 5)], to_host, 0.0, before).dropped == 1
    assert tr.committed() == {}
    out = tr.polled([rec(0, 5), rec(0, 6)], to_host, 0.0, [before, after])
    assert (out.dropped, out.accepted) == (1, 1)
    assert tr.commit_now(1.0) == {P0: 6}


def test_records_of_a_partition_being_revoked_are_dropped_but_completions_count() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0, P1])
    tr.polled([rec(0, 1), rec(0, 2), rec(1, 9)], to_host, 0.0)
    tr.revoking([P0])
    assert tr.polled([rec(0, 3), rec(1, 10)], to_host, 0.0).dropped == 1
    assert tr.inflight_in([P0]) == 2
    assert tr.completed([(T, 0, 2)]) == 1
    assert tr.commit_now(1.0, only=[P0]) == {P0: 1}  # never past the unfinished 1
    assert tr.completed([(T, 0, 1)]) == 1
    assert tr.inflight_in([P0]) == 0
    assert tr.commit_now(2.0, only=[P0]) == {P0: 3}
    assert tr.revoked([P0]) == 0
    assert tr.assigned_partitions() == [P1]
    assert tr.inflight == 2  # P1's 9 and 10 are untouched


def test_revoke_with_work_left_drops_it_and_late_completions_are_ignored() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 1), rec(0, 2)], to_host, 0.0)
    tr.revoking([P0])
    assert tr.commit_now(1.0, only=[P0]) == {P0: 1}
    assert tr.revoked([P0]) == 2
    assert tr.inflight == 0
    assert len(tr.targets[HOST].inflight) == 0
    assert tr.completed([(T, 0, 1), (T, 0, 2)]) == 0
    assert tr.commit_now(2.0) == {}
    assert tr.committed() == {}


def test_lost_drops_everything_without_a_commit() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0, P1])
    tr.polled([rec(0, 1), rec(1, 1)], to_host, 0.0)
    assert tr.lost([P0]) == 1
    assert tr.completed([(T, 0, 1)]) == 0
    assert tr.commit_now(1.0) == {P1: 1}
    assert tr.owns(P1)
    assert not tr.owns(P0)


def test_reassign_after_revoke_starts_fresh() -> None:
    """The new assignment starts at the group's commit, maybe below what we saw before:
    those offsets are new records, not replays, and no old commit mark lingers."""
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 10), rec(0, 11)], to_host, 0.0)
    tr.completed([(T, 0, 10)])
    assert tr.commit_now(1.0) == {P0: 11}
    tr.revoking([P0])
    tr.revoked([P0])
    tr.assigned([P0])
    assert tr.committed() == {}
    out = tr.polled([rec(0, 11), rec(0, 12)], to_host, 2.0)
    assert out.accepted == 2
    assert out.replays == 0
    assert tr.commit_now(3.0) == {P0: 11}  # fresh: offered again, even though equal


def test_assigned_again_without_a_revoke_forgets_the_old_assignment() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 1)], to_host, 0.0)
    tr.assigned([P0])
    assert tr.inflight == 0
    assert tr.completed([(T, 0, 1)]) == 0


def test_replays_are_not_tracked_twice() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 5)], to_host, 0.0)
    out = tr.polled([rec(0, 5), rec(0, 4), rec(0, 6)], to_host, 0.0)
    assert (out.accepted, out.replays) == (1, 2)
    assert tr.inflight == 2


# ------------------------------------------------------------ targets


def test_sends_wait_for_recovery_then_go_in_order() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0, P1])
    out = tr.polled([rec(0, 1, "a"), rec(1, 7, "b"), rec(0, 2, "a")], to_host, 0.0)
    assert out.sends == []  # a new target is RECOVERING until it answers
    assert out.per_partition == {0: 2, 1: 1}
    first = ready(tr)
    assert first is not None
    assert offsets(first) == [1, 7, 2]
    assert not first.resend
    assert tr.resent == 0
    out = tr.polled([rec(0, 3, "a")], to_host, 0.0)
    assert [offsets(s) for s in out.sends] == [[3]]
    assert out.sends[0].incarnation == "i1"
    assert out.sends[0].epoch == first.epoch


def test_incarnation_change_resends_everything_in_flight_in_original_order_first() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 1)], to_host, 0.0)
    send = ready(tr)
    assert send is not None
    tr.polled([rec(0, 2), rec(0, 3)], to_host, 0.0)
    tr.completed([(T, 0, 2)])
    assert tr.incarnation_seen(HOST, send.epoch, "i2")  # the host restarted
    assert tr.targets[HOST].state == RECOVERING
    assert tr.recoveries == 1
    assert tr.polled([rec(0, 4)], to_host, 0.0).sends == []  # held back behind the resend
    resend = ready(tr, inc="i2")
    assert resend is not None
    assert resend.resend
    assert offsets(resend) == [1, 3, 4]
    assert resend.incarnation == "i2"
    assert tr.resent == 3
    assert tr.targets[HOST].state == READY


def test_failed_delivery_recovers_and_stale_answers_are_ignored() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 1)], to_host, 0.0)
    send = ready(tr)
    assert send is not None
    assert tr.target_failed(HOST, send.epoch)
    assert not tr.target_failed(HOST, send.epoch)  # the same failure, reported twice
    assert not tr.incarnation_seen(HOST, send.epoch, "i9")  # an old call's answer
    assert tr.recoveries == 1
    assert tr.recovered(HOST, send.epoch, "i9", 0.0) is None  # not the recovery's epoch
    assert not tr.is_current(HOST, send.epoch)


def test_same_incarnation_is_not_a_recovery() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 1)], to_host, 0.0)
    send = ready(tr)
    assert send is not None
    assert not tr.incarnation_seen(HOST, send.epoch, "i1")
    assert tr.targets[HOST].state == READY


def test_recovery_backs_off_and_is_retried_after_a_timeout() -> None:
    tr = ConsumerTracker(recovery_timeout_s=60.0)
    tr.assigned([P0])
    tr.polled([rec(0, 1)], to_host, 0.0)
    (call,) = tr.due(0.0).recover
    assert tr.due(0.01).recover == []  # one call at a time
    tr.recovery_failed(HOST, call.epoch, 0.0)
    assert tr.due(0.01).recover == []  # backing off 50 ms
    (call,) = tr.due(0.06).recover
    tr.recovery_failed(HOST, call.epoch, 0.06)
    assert tr.due(0.1).recover == []  # now 100 ms
    (call,) = tr.due(0.17).recover
    assert tr.due(60.0).recover == []
    (again,) = tr.due(60.2).recover  # the hung call is abandoned, a new one goes out
    assert again.epoch != call.epoch
    assert tr.recovered(HOST, call.epoch, "late", 60.3) is None
    send = tr.recovered(HOST, again.epoch, "i1", 60.3)
    assert send is not None
    assert offsets(send) == [1]


def test_health_probes_once_per_interval_only_ready_targets_with_work() -> None:
    tr = ConsumerTracker(health_interval_s=1.0)
    tr.assigned([P0])
    tr.polled([rec(0, 1, "a")], lambda u: "h-a", 0.0)
    tr.polled([rec(0, 2, "b")], lambda u: "h-b", 0.0)
    first = tr.due(0.0)
    assert first.health_tick
    assert first.probe == []
    for call in first.recover:
        tr.recovered(call.key, call.epoch, "i1", 0.0)
    tr.completed([(T, 0, 2)])  # h-b holds nothing now
    assert tr.due(0.5).probe == []
    assert not tr.due(0.5).health_tick
    due = tr.due(1.0)
    assert due.health_tick
    assert due.probe == [Call("h-a", tr.targets["h-a"].epoch, False)]
    assert tr.due(2.1).probe == []  # the first probe is still out
    (probe,) = due.probe
    assert not tr.incarnation_seen("h-a", probe.epoch, "i1", probe=True)
    assert [c.key for c in tr.due(3.2).probe] == ["h-a"]


def test_empty_dedicated_targets_are_not_recovered_hosts_are() -> None:
    tr = ConsumerTracker(forget_after_s=10.0)
    tr.assigned([P0])
    tr.polled([rec(0, 1, "a")], lambda u: "user:kf:a", 0.0)
    tr.polled([rec(0, 2, "b")], to_host, 0.0)
    calls = {c.key: c for c in tr.due(0.0).recover}
    assert calls["user:kf:a"].dedicated
    assert not calls[HOST].dedicated
    tr.completed([(T, 0, 1), (T, 0, 2)])
    tr.recovery_failed("user:kf:a", calls["user:kf:a"].epoch, 0.0)
    tr.recovery_failed(HOST, calls[HOST].epoch, 0.0)
    assert [c.key for c in tr.due(5.0).recover] == [HOST]


def test_idle_dedicated_users_and_targets_are_forgotten_busy_ones_kept() -> None:
    tr = ConsumerTracker(forget_after_s=10.0, health_interval_s=1.0)
    tr.assigned([P0, P1])
    tr.polled([rec(0, 1, "a")], lambda u: "user:kf:a", 0.0)
    tr.polled([rec(1, 1, "b")], to_host, 0.0)  # over the cap: hosted
    tr.polled([rec(0, 2, "c")], lambda u: "user:kf:c", 0.0)
    tr.completed([(T, 0, 1), (T, 1, 1)])  # c still has work
    due = tr.due(11.0)
    assert sorted((f.user, f.key, f.tp) for f in due.forgotten_users) == [
        ("a", "user:kf:a", P0),
        ("b", HOST, P1),
    ]
    assert due.forgotten_targets == ["user:kf:a"]
    assert tr.knows_user("c")
    assert not tr.knows_user("a")
    assert set(tr.targets) == {HOST, "user:kf:c"}


def test_a_user_seen_again_is_not_forgotten() -> None:
    tr = ConsumerTracker(forget_after_s=10.0)
    tr.assigned([P0])
    tr.polled([rec(0, 1, "a")], lambda u: "user:kf:a", 0.0)
    tr.completed([(T, 0, 1)])
    tr.polled([rec(0, 2, "a")], lambda u: "user:kf:a", 8.0)
    tr.completed([(T, 0, 2)])
    assert tr.due(11.0).forgotten_users == []
    assert [f.user for f in tr.due(18.5).forgotten_users] == ["a"]


def test_users_of_a_revoked_partition_are_left_to_its_next_owner() -> None:
    """Their placement is the new owner's to release, not ours."""
    tr = ConsumerTracker(forget_after_s=10.0)
    tr.assigned([P0])
    tr.polled([rec(0, 1, "a")], lambda u: "user:kf:a", 0.0)
    tr.revoking([P0])
    tr.revoked([P0])
    due = tr.due(100.0)
    assert due.forgotten_users == []
    assert due.forgotten_targets == ["user:kf:a"]


def test_hosted_mode_forgets_nothing() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 1, "a")], to_host, 0.0)
    tr.completed([(T, 0, 1)])
    due = tr.due(1e6)
    assert due.forgotten_users == []
    assert due.forgotten_targets == []
    assert not tr.knows_user("a")


# ------------------------------------------------------------ commits


def test_commit_due_by_count_or_interval() -> None:
    tr = ConsumerTracker(commit_every_messages=2, commit_interval_s=1.0)
    tr.assigned([P0])
    assert tr.commit_due(0.0) == {}
    tr.polled([rec(0, 1), rec(0, 2), rec(0, 3)], to_host, 0.0)
    tr.completed([(T, 0, 1)])
    assert tr.commit_due(0.1) == {}
    tr.completed([(T, 0, 2)])
    assert tr.commit_due(0.2) == {P0: 3}
    tr.completed([(T, 0, 3)])
    assert tr.commit_due(0.3) == {}
    assert tr.commit_due(1.3) == {P0: 4}


def test_failed_commit_is_offered_again() -> None:
    tr = ConsumerTracker()
    tr.assigned([P0])
    tr.polled([rec(0, 1)], to_host, 0.0)
    tr.completed([(T, 0, 1)])
    assert tr.commit_now(0.0) == {P0: 2}
    assert tr.commit_now(0.1) == {}
    tr.commit_failed([P0, P1])
    assert tr.commit_now(0.2) == {P0: 2}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("poll"), st.integers(0, 1), st.integers(1, 4), st.integers(0, 3)),
        st.tuples(st.just("done"), st.integers(0, 1), st.integers(0, 40), st.just(0)),
        st.tuples(st.just("revoke"), st.integers(0, 1), st.just(0), st.just(0)),
        st.tuples(st.just("lost"), st.integers(0, 1), st.just(0), st.just(0)),
        st.tuples(st.just("assign"), st.integers(0, 1), st.just(0), st.just(0)),
        st.tuples(st.just("fail"), st.integers(0, 2), st.just(0), st.just(0)),
        st.tuples(st.just("commit"), st.just(0), st.just(0), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_commits_never_pass_an_unfinished_offset_nor_touch_unowned_partitions(
    ops: list[tuple[str, int, int, int]],
) -> None:
    """Random polls, completions, rebalances and target failures: every commit is for an
    owned partition and at most its smallest offset still in flight; and every delivery
    still in flight is held by exactly one target, in offset order per partition."""
    tr = ConsumerTracker(commit_every_messages=1, commit_interval_s=0.0)
    owned: set[tuple[str, int]] = set()
    next_offset = {0: 0, 1: 0}
    inflight: dict[tuple[str, int], set[int]] = {P0: set(), P1: set()}
    now = 0.0
    for op, p, n, users in ops:
        now += 1.0
        tp = (T, p)
        if op == "assign" and tp not in owned:
            tr.assigned([tp])
            owned.add(tp)
            inflight[tp] = set()
        elif op in ("revoke", "lost") and tp in owned:
            if op == "revoke":
                tr.revoking([tp])
                committed = tr.commit_now(now, only=[tp])
                if inflight[tp] and tp in committed:
                    assert committed[tp] <= min(inflight[tp])
                tr.revoked([tp])
            else:
                tr.lost([tp])
            owned.discard(tp)
            inflight[tp] = set()
        elif op == "poll":
            batch = []
            for _ in range(n):
                batch.append(rec(p, next_offset[p], f"u{next_offset[p] % (users + 1)}"))
                next_offset[p] += 1
            out = tr.polled(batch, lambda u: f"h{int(u[1:]) % 2}", now)
            if tp in owned:
                assert out.accepted == n
                inflight[tp] |= {d.offset for d in batch}
            else:
                assert out.accepted == 0
                assert out.dropped == n
        elif op == "done":
            was = n in inflight[tp] and tp in owned
            assert tr.completed([(T, p, n)]) == (1 if was else 0)
            inflight[tp].discard(n)
        elif op == "fail":
            for call in tr.due(now).recover:
                tr.recovered(call.key, call.epoch, f"i{now}", now)
            key = f"h{p % 2}"
            t = tr.targets.get(key)
            if t is not None:
                tr.target_failed(key, t.epoch)
        else:
            for tp_c, o in tr.commit_due(now).items():
                assert tp_c in owned
                if inflight[tp_c]:
                    assert o <= min(inflight[tp_c])
        assert set(tr.committed()) <= owned
        assert tr.inflight == sum(len(v) for v in inflight.values())
        held = [tpo for t in tr.targets.values() for tpo in t.inflight]
        assert len(held) == len(set(held)) == tr.inflight
        for t in tr.targets.values():
            for part in (0, 1):
                offs = [o for (_t, pp, o) in t.inflight if pp == part]
                assert offs == sorted(offs)

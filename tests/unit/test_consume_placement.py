"""Dedicated-mode placement: one decision per user, shared by every consumer."""

from __future__ import annotations

from qywx_ray.consume.placement import (
    MemoryPlacementStore,
    Placement,
    Want,
    decide,
    is_dedicated,
)


def want(user: str) -> Want:
    return Want(user, f"user:kf:{user}", f"host-{len(user) % 2}")


def test_decide_first_decision_sticks_new_users_get_a_slot_while_free() -> None:
    assert decide(None, 0, 1, want("a")) == "user:kf:a"
    assert decide(None, 1, 1, want("a")) == "host-1"
    assert decide("host-1", 0, 1, want("a")) == "host-1"  # even with a slot free now
    assert decide("user:kf:a", 5, 1, want("a")) == "user:kf:a"  # even over the cap now
    assert is_dedicated("user:kf:a")
    assert not is_dedicated("host-1")


def test_two_consumers_resolve_the_same_target_and_share_the_cap() -> None:
    """The cap is the pipeline's, not a per-consumer share; and whoever owns the user's
    partition later (restart, partition move) finds the same target."""
    store = MemoryPlacementStore()
    a, b = Placement(store, cap=2), Placement(store, cap=2)
    a.resolve([want("u1"), want("u2")])
    b.resolve([want("u3")])
    assert (a.route("u1"), a.route("u2"), b.route("u3")) == ("user:kf:u1", "user:kf:u2", "host-0")
    b.resolve([want("u2"), want("u1")])  # the partition moved to b, users in another order
    assert (b.route("u1"), b.route("u2")) == ("user:kf:u1", "user:kf:u2")
    fresh = Placement(store, cap=2)  # a restarted consumer
    fresh.resolve([want("u3"), want("u1")])
    assert (fresh.route("u1"), fresh.route("u3")) == ("user:kf:u1", "host-0")
    assert store.dedicated == {"u1", "u2"}


def test_one_store_call_per_batch_and_none_for_known_users() -> None:
    store = MemoryPlacementStore()
    p = Placement(store, cap=10)
    p.resolve([want(f"u{i}") for i in range(50)])
    assert store.calls == 1
    p.resolve([want("u1"), want("u7")])
    assert store.calls == 1
    p.forget(["u1"])
    p.resolve([want("u1"), want("u7")])
    assert store.calls == 2
    assert p.route("u1") == "user:kf:u1"
    p.clear()
    assert not p.known("u7")


def test_release_is_compare_and_delete_and_frees_the_slot() -> None:
    store = MemoryPlacementStore()
    p = Placement(store, cap=1)
    p.resolve([want("u1"), want("u2")])
    assert p.route("u2") == "host-0"
    store.release([("u1", "host-0")])  # not what the record says: kept
    assert store.records["u1"] == "user:kf:u1"
    assert store.dedicated == {"u1"}
    store.release([("u1", "user:kf:u1"), ("u2", "host-0")])
    assert store.records == {}
    assert store.dedicated == set()
    q = Placement(store, cap=1)
    q.resolve([want("u2")])
    assert q.route("u2") == "user:kf:u2"  # the freed slot, now u2's


def test_a_new_dedicated_user_claims_a_spare_once_and_only_under_the_cap() -> None:
    """The warm pool: the decision that makes a user dedicated takes one spare; a known
    user, a hosted one (cap reached) or a user after the pool ran dry takes none."""
    assert decide(None, 0, 1, want("a"), spare="user:~pool:p:1") == "user:~pool:p:1"
    assert decide(None, 1, 1, want("a"), spare="user:~pool:p:1") == "host-1"
    assert decide("user:kf:a", 0, 1, want("a"), spare="user:~pool:p:1") == "user:kf:a"
    store = MemoryPlacementStore()
    store.spares = ["user:~pool:p:1", "user:~pool:p:2"]
    p = Placement(store, cap=3)
    p.resolve([want("u1")])
    p.resolve([want("u1"), want("u2"), want("u3"), want("u4")])
    assert [p.route(f"u{i}") for i in range(1, 5)] == [
        "user:~pool:p:1",
        "user:~pool:p:2",
        "user:kf:u3",  # the pool is empty: its own actor, started on demand
        "host-0",  # over the cap
    ]
    assert store.spares == []
    assert is_dedicated("user:~pool:p:1")
    full = MemoryPlacementStore()
    full.spares = ["user:~pool:p:3"]
    q = Placement(full, cap=0)
    q.resolve([want("u9")])
    assert q.route("u9") == "host-0"
    assert full.spares == ["user:~pool:p:3"]  # a hosted decision takes no spare

"""RedisPlacementStore against a real Redis: shared decisions, cluster-wide cap, one round
trip per batch, compare-and-delete release."""

from __future__ import annotations

import pytest
import redis as redis_lib

from qywx_ray.consume.placement import Placement, RedisPlacementStore, Want, placement_prefix
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_redis
from qywx_ray.store.settings import RedisSettings

pytestmark = pytest.mark.integration


def want(user: str) -> Want:
    return Want(user, f"user:kf:{user}", "host-0")


def _script_calls(client: redis_lib.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def test_redis_placement_is_shared_capped_batched_and_released(
    redis_url: str, redis_client: redis_lib.Redis, unique: str
) -> None:
    settings = Settings(redis=RedisSettings(url=redis_url))
    prefix = placement_prefix(f"t{unique}")
    a = Placement(RedisPlacementStore(make_redis(settings.redis), prefix), cap=2)
    b = Placement(RedisPlacementStore(make_redis(settings.redis), prefix), cap=2)
    a.resolve([want("u0")])  # loads the script (EVALSHA miss, then EVAL) before counting
    redis_client.config_resetstat()
    a.resolve([want(f"u{i}") for i in range(1, 40)])
    assert _script_calls(redis_client) == 1  # one round trip for 39 new users
    assert [a.route(f"u{i}") for i in range(4)] == [
        "user:kf:u0",
        "user:kf:u1",
        "host-0",
        "host-0",
    ]
    b.resolve([want("u3"), want("u1"), want("u0")])  # another consumer, other order
    assert (b.route("u0"), b.route("u1"), b.route("u3")) == ("user:kf:u0", "user:kf:u1", "host-0")
    assert redis_client.smembers(f"{prefix}:dedicated") == {b"u0", b"u1"}
    assert redis_client.get(f"{prefix}:u:u1") == b"user:kf:u1"

    b.store.release([("u1", "host-0")])  # not what the record says: kept
    assert redis_client.get(f"{prefix}:u:u1") == b"user:kf:u1"
    b.store.release([("u1", "user:kf:u1"), ("u2", "host-0")])
    assert redis_client.get(f"{prefix}:u:u1") is None
    assert redis_client.get(f"{prefix}:u:u2") is None
    assert redis_client.smembers(f"{prefix}:dedicated") == {b"u0"}
    c = Placement(RedisPlacementStore(make_redis(settings.redis), prefix), cap=2)
    c.resolve([want("u2"), want("u5")])
    assert (c.route("u2"), c.route("u5")) == ("user:kf:u2", "host-0")  # u1's slot, now u2's


def test_redis_placement_claims_each_spare_once_across_consumers(
    redis_url: str, redis_client: redis_lib.Redis, unique: str
) -> None:
    """The warm pool's spares are taken by the script that decides a dedicated user, one
    per such user, never two users on one spare, whichever consumer asks."""
    settings = Settings(redis=RedisSettings(url=redis_url))
    prefix = placement_prefix(f"t{unique}")
    spares = {f"user:~pool:p:{i}" for i in range(3)}
    redis_client.sadd(f"{prefix}:pool:spares", *spares)
    a = Placement(RedisPlacementStore(make_redis(settings.redis), prefix), cap=5)
    b = Placement(RedisPlacementStore(make_redis(settings.redis), prefix), cap=5)
    a.resolve([want("u0"), want("u1")])
    b.resolve([want("u1"), want("u2"), want("u3"), want("u4"), want("u5")])
    routes = {u: b.route(u) for u in ("u1", "u2", "u3", "u4", "u5")} | {"u0": a.route("u0")}
    assert routes["u1"] == a.route("u1")
    claimed = [routes[u] for u in ("u0", "u1", "u2")]
    assert set(claimed) == spares  # each spare once
    assert (routes["u3"], routes["u4"]) == ("user:kf:u3", "user:kf:u4")  # pool empty
    assert routes["u5"] == "host-0"  # over the cap
    assert redis_client.scard(f"{prefix}:pool:spares") == 0
    assert redis_client.get(f"{prefix}:u:u0") == routes["u0"].encode()
    redis_client.sadd(f"{prefix}:pool:spares", "user:~pool:p:late")
    b.resolve([want("u6")])  # the cap is reached: hosted, and the spare stays listed
    assert b.route("u6") == "host-0"
    assert redis_client.smembers(f"{prefix}:pool:spares") == {b"user:~pool:p:late"}

"""Differential test: the simulator's in-memory Redis against a real one, on the ingest's Lua.

Random sequences of the ingest's own scripts (lock acquire / extend / release, fenced
cursor commit, spool append and fenced trim, resends of a trim with the same op key) and
the plain commands it uses (HGET, SMISMEMBER, SMEMBERS, LRANGE, GET, SCARD), with key
loss in between (fence counters, lock keys), go to `FakeRedisServer` and to a real Redis;
every reply and the final keyspace must match. Fence values come from each server's
clock, so they are compared by what they decide (commit results), not by value.
The simulator is only as good as this model.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any

import pytest
import redis as redis_lib

from qywx_ray.ingest.cursor import _COMMIT
from qywx_ray.ingest.locks import _ACQUIRE, _EXTEND, _RELEASE
from qywx_ray.ingest.spool import _APPEND, _TRIM
from tests.sim_ingest.luaredis import FakeRedisServer, Status

pytestmark = pytest.mark.integration

SEQUENCES = 120
OPS = 40
P = "t:"  # key prefix
LOCKS = ("sync:a", "spool-replay")
TOKENS = ("x", "y", "z")
USERS = ("u1", "u2", "u3")
VALUES = tuple(f"v{i}".encode() for i in range(5))


def lock_key(name: str) -> str:
    return f"{P}lock:{name}"


class Side:
    """One server (real or fake) and the fences it handed out."""

    def __init__(self, run: Any, command: Any) -> None:
        self.run = run  # (script, keys, args) -> reply
        self.command = command  # (*args) -> reply
        self.fences: dict[tuple[str, str], int] = {}


def random_op(r: random.Random, sent: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    kind = r.choices(
        ("acquire", "extend", "release", "commit", "append", "trim", "resend", "read", "loss"),
        (4, 2, 2, 4, 4, 4, 1, 3, 1),
    )[0]
    name, token = r.choice(LOCKS), r.choice(TOKENS)
    if kind == "append":
        groups = [
            (u, [r.choice(VALUES) for _ in range(r.randint(1, 3))])
            for u in r.sample(USERS, r.randint(1, 3))
        ]
        return ("append", r.choice(("force", "ifspooled")), groups)
    if kind == "trim":
        groups = [
            (u, [r.choice(VALUES) for _ in range(r.randint(1, 3))])
            for u in r.sample(USERS, r.randint(1, 2))
        ]
        op = ("trim", token, f"op{r.randrange(10**9)}", groups)
        sent.append(op)
        return op
    if kind == "resend":
        return sent[-1] if sent else ("read", "users")
    if kind == "read":
        return ("read", r.choice(("cursor", "members", "ismember", "lists", "depth")))
    if kind == "loss":
        return ("loss", r.choice(("fence", "locks", "cursor")))
    if kind == "commit":
        return ("commit", name, token, f"c{r.randrange(100)}")
    return (kind, name, token)


def apply(side: Side, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "acquire":
        _, name, token = op
        fence = side.run(_ACQUIRE, [lock_key(name), lock_key(name) + ":fence"], [token, 60000])
        if fence:
            side.fences[(name, token)] = int(fence)
        return None if fence is None else ("fence" if fence else 0)
    if kind == "extend":
        _, name, token = op
        return side.run(_EXTEND, [lock_key(name)], [token, 60000])
    if kind == "release":
        _, name, token = op
        return side.run(_RELEASE, [lock_key(name)], [token])
    if kind == "commit":
        _, name, token, cursor = op
        fence = side.fences.get((name, token), 0)
        return side.run(_COMMIT, [lock_key(name), f"{P}cursor:a"], [token, fence, cursor])
    if kind == "append":
        _, mode, groups = op
        args: list[Any] = [f"{P}spool:", mode]
        for user, values in groups:
            args += [user, len(values), *values]
        return side.run(_APPEND, [f"{P}spool-index", f"{P}spool-depth"], args)
    if kind == "trim":
        _, token, op_id, groups = op
        args = [f"{P}spool:", token]
        for user, values in groups:
            args += [user, len(values), *(hashlib.sha1(v).hexdigest() for v in values)]
        keys = [
            f"{P}spool-index",
            f"{P}spool-depth",
            f"{P}spool-op:{op_id}",
            lock_key("spool-replay"),
        ]
        return side.run(_TRIM, keys, args)
    if kind == "read":
        what = op[1]
        if what == "cursor":
            return side.command("HGET", f"{P}cursor:a", "cursor")
        if what == "members":
            return sorted(side.command("SMEMBERS", f"{P}spool-index"))
        if what == "ismember":
            return side.command("SMISMEMBER", f"{P}spool-index", *USERS)
        if what == "depth":
            return [
                side.command("GET", f"{P}spool-depth"),
                side.command("SCARD", f"{P}spool-index"),
            ]
        return [side.command("LRANGE", f"{P}spool:{u}", 0, -1) for u in USERS]
    what = op[1]
    if what == "fence":
        return side.command("DEL", *(lock_key(n) + ":fence" for n in LOCKS))
    if what == "locks":
        return side.command("DEL", *(lock_key(n) for n in LOCKS))
    return side.command("DEL", f"{P}cursor:a")


def normal(x: Any) -> Any:
    if isinstance(x, Status):
        return str(x)
    if isinstance(x, list):
        return [normal(v) for v in x]
    if isinstance(x, set):
        return sorted(x)
    return x


def dump(command: Any) -> dict[str, Any]:
    """Every key but the fence counters, with the cursor hash's fence field dropped."""
    out: dict[str, Any] = {}
    for u in USERS:
        out[f"spool:{u}"] = command("LRANGE", f"{P}spool:{u}", 0, -1)
    out["index"] = sorted(command("SMEMBERS", f"{P}spool-index"))
    out["depth"] = command("GET", f"{P}spool-depth")
    out["cursor"] = command("HGET", f"{P}cursor:a", "cursor")
    out["locks"] = [command("GET", lock_key(n)) for n in LOCKS]
    return out


def test_fake_redis_matches_real_redis_on_the_ingest_scripts(
    redis_client: redis_lib.Redis,
) -> None:
    real_scripts = {
        s: redis_client.register_script(s)
        for s in (_ACQUIRE, _EXTEND, _RELEASE, _COMMIT, _APPEND, _TRIM)
    }

    def real_run(script: str, keys: list[Any], args: list[Any]) -> Any:
        return real_scripts[script](keys=keys, args=args)

    trims_that_removed = acquires_refused = 0
    for seq in range(SEQUENCES):
        redis_client.flushdb()
        fake = FakeRedisServer(lambda: time.time() * 1000.0, epoch_s=0)
        real = Side(real_run, redis_client.execute_command)
        model = Side(fake.eval, fake.command)
        r = random.Random(f"luaredis:{seq}")
        sent: list[tuple[Any, ...]] = []
        for i in range(OPS):
            op = random_op(r, sent)
            want = normal(apply(real, op))
            got = normal(apply(model, op))
            assert got == want, f"sequence {seq}, op {i} {op}: fake {got!r} != redis {want!r}"
            if op[0] == "trim" and want[0] == 1 and want[3] < sum(len(v) for _, v in op[3]):
                trims_that_removed += 1
            acquires_refused += op[0] == "acquire" and want == 0
        assert dump(model.command) == dump(redis_client.execute_command), f"sequence {seq}"
    # The sequences reach the interesting branches, not only the refusals.
    assert trims_that_removed > 20, (trims_that_removed, acquires_refused)
    assert acquires_refused > 20, (trims_that_removed, acquires_refused)


def test_lua_numbers_reach_redis_as_redis_formats_them() -> None:
    """A Lua 5.1 number passed to redis.call becomes '%.14g' text in Redis: a script that
    SETs a 16-digit number without string.format stores 1.7e+15 - the fake must agree."""
    fake = FakeRedisServer(lambda: 0.0)
    fake.eval("redis.call('SET', KEYS[1], 1700000000000000)", ["k"], [])
    assert fake.command("GET", "k") == b"1.7e+15"
    fake.eval("redis.call('SET', KEYS[1], string.format('%d', 1700000000000000))", ["k"], [])
    assert fake.command("GET", "k") == b"1700000000000000"
    assert fake.eval("return {1, 2, nil, 4}", [], []) == [1, 2]
    assert fake.eval("return 3.7", [], []) == 3
    assert fake.eval("return redis.call('GET', 'missing')", [], []) is None

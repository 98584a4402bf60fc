"""Differential test: the simulator's CommitModel against the real state commit script.

Random commit calls (plain done-flags, state writes of a few users that mostly chain on
what is stored, sometimes stale, unchanged, already done or repeated; and resends of
earlier calls with the same op id, as the Deduplicator does after a lost reply) go to
`CommitModel` (tests/sim/world.py), to `MemoryStateStore` (the unit tests' store) and to
`RedisDoneStore.commit` (commit_args + COMMIT_LUA) on a real Redis: every answer and the
final done-flags and states must match. The simulator is only as good as this model.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import cast

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from qywx_ray.consume.dedup import DONE_KEY, RedisDoneStore
from qywx_ray.consume.state import LOAD_LUA, STATE_KEY, MemoryStateStore, StateWrite, parse_loaded
from tests.sim.world import CommitModel

pytestmark = pytest.mark.integration

USERS = ("a", "b", "c")
MIDS: list[str] = []  # every message id drawn so far
CALLS = 250

Call = tuple[list[str], list[tuple[str, StateWrite]], str]


def mid(r: random.Random) -> str:
    """Mostly a new message id; sometimes one already drawn (done, or twice in a call)."""
    if MIDS and r.random() < 0.1:
        return r.choice(MIDS[-8:])  # recent: often in the same call
    MIDS.append(f"m{len(MIDS)}")
    return MIDS[-1]


def random_call(r: random.Random, model: CommitModel, sent: list[Call]) -> Call:
    """One call drawn against the model's state (so most writes chain and apply)."""
    if sent and r.random() < 0.1:
        return r.choice(sent)  # the same call again: a resend after an unknown outcome
    plain = [mid(r) for _ in range(r.randint(0, 2))]
    writes: list[tuple[str, StateWrite]] = []
    view = {u: model.states.get(u, (0, b""))[0] for u in USERS}  # the host's versions
    for u in USERS:
        if r.random() < 0.15:
            view[u] += r.choice((-1, 1))  # a stale (or future) copy
    for _ in range(r.randint(0, 6)):
        u = r.choice(USERS)
        if r.random() < 0.1:
            view[u] = r.randint(0, 3)  # a reload in between: breaks the chain
        data = None if r.random() < 0.25 else f'{{"n":{r.randrange(100)}}}'.encode()
        writes.append((mid(r), StateWrite(u, view[u], data)))
        if data is not None:
            view[u] += 1
    call = (plain, writes, uuid.uuid4().hex)
    sent.append(call)
    return call


def redis_state(client: redis_lib.Redis) -> tuple[set[str], dict[str, tuple[int, bytes]]]:
    done = {m for m in MIDS if client.exists(DONE_KEY.format(m))}
    got = client.eval(LOAD_LUA, len(USERS), *[STATE_KEY.format(u) for u in USERS])
    slots = parse_loaded(USERS, cast(list[bytes], got))
    states = {u: (s.version, s.raw) for u, s in slots.items() if client.exists(STATE_KEY.format(u))}
    return done, states


def test_commit_model_matches_the_lua_script(redis_url: str, redis_client: redis_lib.Redis) -> None:
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        store = RedisDoneStore(client, ttl_s=600, state_ttl_s=600)
        MIDS.clear()
        model, memory = CommitModel(), MemoryStateStore()
        r = random.Random("commit-model")
        sent: list[Call] = []
        applied = refused_any = 0
        try:
            for i in range(CALLS):
                plain, writes, op = random_call(r, model, sent)
                want, _, _, _ = model.commit(plain, writes, op)
                got = await store.commit(plain, writes, op)
                assert got == want, f"call {i} {plain} {writes}: redis {got} != model {want}"
                mem = await memory.commit(plain, writes, op)
                assert mem == want, f"call {i}: memory store {mem} != model {want}"
                applied += len(writes) - len(want)
                refused_any += bool(want)
            done, states = redis_state(redis_client)
            assert done == model.done & set(MIDS)
            assert states == model.states
            assert {u: (s.version, s.raw) for u, s in memory.states.items()} == model.states
            # The draw exercised both sides of the commit.
            assert applied > 100
            assert refused_any > 20
        finally:
            await client.aclose()

    asyncio.run(run())

"""Differential test: the simulator's ParkingModel against the real Lua scripts.

Random sequences of admit / park / hold / advance (with op ids, and resends of earlier ops with
the same op id, as a host does after a lost reply) go to `ParkingModel` and to
`AsyncParkingLot` on a real Redis; every reply and the final flags and lists must match.
The simulator is only as good as this model.
"""

from __future__ import annotations

import random
import uuid
from typing import Any, cast

import pytest
import redis as redis_lib
import redis.asyncio as aioredis

from qywx_ray.consume.types import HoldRequest, ParkRequest
from qywx_ray.dlq.parking import AT_PREFIX, FLAG_PREFIX, LIST_PREFIX, AsyncParkingLot
from qywx_ray.dlq.settings import DLQSettings
from tests.sim.world import ParkingModel

pytestmark = pytest.mark.integration

USERS = ("a", "b")
MIDS = tuple(f"m{i}" for i in range(5))
SEQUENCES = 150
OPS = 30

Op = tuple[str, tuple[Any, ...]]


def random_ops(r: random.Random, model: ParkingModel) -> list[Op]:
    """Ops drawn against the model's state as it evolves (so advances often hit)."""
    ops: list[Op] = []
    sent: list[Op] = []
    for _ in range(OPS):
        kind = r.choices(("admit", "park", "hold", "advance", "resend"), (4, 2, 1, 3, 1))[0]
        user = r.choice(USERS)
        flag = model.flags.get(user)
        mid = flag if flag is not None and r.random() < 0.6 else r.choice(MIDS)
        op: Op
        if kind == "admit":
            items = [
                (
                    r.choice(USERS),
                    r.choice(MIDS),
                    f"v{r.randrange(9)}".encode(),
                    r.random() < 0.3,
                    r.choice((-1, 0, 1)),
                    r.randint(-1, 9),
                )
                for _ in range(r.randint(1, 4))
            ]
            op = ("admit", (items,))
        elif kind == "park":
            pending = [f"p{r.randrange(9)}".encode() for _ in range(r.randint(0, 3))]
            replaces = r.sample(MIDS, r.randint(0, 2))
            request = ParkRequest(user, mid, r.randint(0, 3), pending, uuid.uuid4().hex, replaces)
            op = ("park", (request,))
            sent.append(op)
        elif kind == "hold":
            values = [f"h{r.randrange(9)}".encode() for _ in range(r.randint(1, 3))]
            position = (r.choice((-1, 0, 1)), r.randint(-1, 9))
            op = ("hold", (HoldRequest(user, mid, values, uuid.uuid4().hex, position),))
            sent.append(op)
        elif kind == "advance":
            op = ("advance", (user, mid, r.randint(0, 3), r.randint(0, 3), uuid.uuid4().hex))
            sent.append(op)
        elif sent:
            op = r.choice(sent)  # the same call again: a retry after an unknown outcome
        else:
            continue
        apply_model(model, op)
        ops.append(op)
    return ops


def apply_model(model: ParkingModel, op: Op) -> Any:
    kind, args = op
    if kind == "admit":
        return model.admit(*args)
    if kind == "park":
        return model.park(*args)
    if kind == "hold":
        model.hold(*args)
        return None
    return model.advance(*args)


async def apply_real(lot: AsyncParkingLot, op: Op) -> Any:
    kind, args = op
    if kind == "admit":
        return await lot.admit(*args)
    if kind == "park":
        return await lot.park(*args)
    if kind == "hold":
        await lot.hold(*args)
        return None
    return await lot.advance(*args)


State = tuple[dict[str, str], dict[str, list[bytes]], dict[str, str]]


def real_state(client: redis_lib.Redis) -> State:
    flags: dict[str, str] = {}
    lots: dict[str, list[bytes]] = {}
    ats: dict[str, str] = {}
    for user in USERS:
        at = cast(bytes | None, client.get(AT_PREFIX + user))
        if at is not None:
            ats[user] = at.decode()
        flag = cast(bytes | None, client.get(FLAG_PREFIX + user))
        if flag is not None:
            flags[user] = flag.decode()
        items = cast(list[bytes], client.lrange(LIST_PREFIX + user, 0, -1))
        if items:
            lots[user] = items
    return flags, lots, ats


async def test_parking_model_matches_the_lua_scripts(
    redis_url: str, redis_client: redis_lib.Redis
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    lot = AsyncParkingLot(client, DLQSettings())
    try:
        for seq in range(SEQUENCES):
            redis_client.flushdb()
            r = random.Random(f"parking:{seq}")
            ops = random_ops(r, ParkingModel())
            model = ParkingModel()  # replay the same ops on a fresh model and on Redis
            for i, op in enumerate(ops):
                want = apply_model(model, op)
                got = await apply_real(lot, op)
                assert got == want, f"sequence {seq}, op {i} {op}: redis {got} != model {want}"
            want = (model.flags, model.lots, model.at)
            assert real_state(redis_client) == want, f"sequence {seq}: final state"
    finally:
        await client.aclose()

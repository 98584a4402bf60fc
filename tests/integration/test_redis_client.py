"""The clients store.client builds talk to a real Redis through their own packer
(pack_resp): what goes in comes back byte for byte, sync and asyncio."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib

from qywx_ray.store.client import make_async_redis, make_redis, pack_resp
from qywx_ray.store.settings import RedisSettings

pytestmark = pytest.mark.integration

VALUES: list[bytes | str | int | float | memoryview] = [
    b"",
    b"\x00\r\n$3\r\n",
    "中文",
    7,
    -1.25,
    memoryview(b"view"),
    b"x" * 70_000,
]
ECHO_LUA = "return {#KEYS, ARGV[1], ARGV[#ARGV]}"


@pytest.fixture
def packed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The argument count of every command packed by store.client's packer."""
    import qywx_ray.store.client as client_module

    counts: list[int] = []

    def counting(encode: Callable[[Any], Any], args: tuple[Any, ...]) -> bytes:
        counts.append(len(args))
        return pack_resp(encode, args)

    monkeypatch.setattr(client_module, "pack_resp", counting)
    return counts


async def test_async_client_round_trips_every_kind_of_value(
    redis_url: str, redis_client: redis_lib.Redis, packed: list[int]
) -> None:
    client = make_async_redis(RedisSettings(url=redis_url))
    try:
        for i, value in enumerate(VALUES):
            await client.set(f"v{i}", value)
            want = bytes(value) if isinstance(value, memoryview) else value
            assert redis_client.get(f"v{i}") == (
                want if isinstance(want, bytes) else str(want).encode()
            )
        script = client.register_script(ECHO_LUA)
        keys = [f"k{i}" for i in range(1500)]
        got = await script(keys=keys, args=[b"first", *[b"y" * 1024] * 500, b"last"])
        assert got == [1500, b"first", b"last"]
        assert max(packed) >= 1500  # the script's call went through pack_resp
    finally:
        await client.aclose()


def test_sync_client_round_trips(
    redis_url: str, redis_client: redis_lib.Redis, packed: list[int]
) -> None:
    client = make_redis(RedisSettings(url=redis_url))
    try:
        client.set("s", memoryview(b"sync"))
        assert redis_client.get("s") == b"sync"
        assert client.execute_command("CONFIG GET", "appendonly")  # two-word command
        pipe = client.pipeline()
        pipe.set("p", 1)
        pipe.incr("p")
        assert pipe.execute() == [True, 2]
        assert 3 in packed  # the SET (and the pipeline's) went through pack_resp
    finally:
        client.close()

"""Redis Sentinel failover with our client factory: acknowledged writes survive, new writes
follow the new master.

A real local Sentinel setup (1 master, 1 replica, 3 sentinels; qywx_ray.devstack.sentinel).
Writers send batches of SETs followed by WAIT 1: a batch counts as acknowledged only when a
replica confirmed it. Connection/read-only errors during the switch are retried with a
bounded backoff, exactly as pipeline code must do.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from qywx_ray.devstack.sentinel import SentinelCluster
from qywx_ray.store.client import make_async_redis, make_redis
from qywx_ray.store.settings import RedisSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BATCH = 10
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError)


def _retryable(exc: redis.RedisError) -> bool:
    """Errors a writer must retry across a failover. Besides connection and read-only
    errors, a WAIT blocked on the demoted master fails with `UNBLOCKED force unblock from
    blocking operation, instance state changed (master -> replica?)`."""
    return isinstance(exc, RETRYABLE) or "UNBLOCKED" in str(exc)


BATCH_DEADLINE_S = 30.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    with SentinelCluster(tmp_path / "sentinel") as c:
        yield c


def _settings(c: SentinelCluster) -> RedisSettings:
    return RedisSettings(
        mode="sentinel",
        sentinel_addrs=c.sentinel_addrs,
        master_name=c.master_name,
        socket_timeout_s=1.0,
    )


def _keys(tag: str, batch: int) -> list[str]:
    return [f"{tag}:{batch}:{i}" for i in range(BATCH)]


def _direct(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0)


def _present(port: int, keys: list[str]) -> list[str]:
    with _direct(port) as r:
        values = r.mget(keys)
    return [k for k, v in zip(keys, values, strict=True) if v == k.encode()]


class SyncWriter:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.retries = 0

    def write(self, keys: list[str]) -> None:
        """Write until a replica acknowledged the batch; bounded backoff on retryable errors."""
        deadline = time.monotonic() + BATCH_DEADLINE_S
        backoff_s = 0.05
        while True:
            try:
                pipe = self.client.pipeline(transaction=False)
                for k in keys:
                    pipe.set(k, k)
                pipe.execute_command("WAIT", 1, 1000)
                if int(pipe.execute()[-1]) >= 1:
                    return
            except redis.RedisError as exc:
                if not _retryable(exc):
                    raise
            self.retries += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"batch {keys[0]} not acknowledged in {BATCH_DEADLINE_S}s")
            time.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 0.5)


class AsyncWriter:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.retries = 0

    async def write(self, keys: list[str]) -> None:
        deadline = time.monotonic() + BATCH_DEADLINE_S
        backoff_s = 0.05
        while True:
            try:
                pipe = self.client.pipeline(transaction=False)
                for k in keys:
                    pipe.set(k, k)
                pipe.execute_command("WAIT", 1, 1000)
                if int((await pipe.execute())[-1]) >= 1:
                    return
            except redis.RedisError as exc:
                if not _retryable(exc):
                    raise
            self.retries += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"batch {keys[0]} not acknowledged in {BATCH_DEADLINE_S}s")
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 0.5)


def test_sentinel_failover_mid_stream_keeps_acknowledged_writes(
    cluster: SentinelCluster,
) -> None:
    old = cluster.master()
    client = make_redis(_settings(cluster))
    writer = SyncWriter(client)
    try:
        before = [k for b in range(20) for k in _keys("before", b)]
        for b in range(20):
            writer.write(_keys("before", b))

        result: dict[str, object] = {}

        def run_failover() -> None:
            try:
                result["new"] = cluster.failover()
            except Exception as exc:  # surfaced below
                result["error"] = exc

        switcher = threading.Thread(target=run_failover, daemon=True)
        switcher.start()
        during: list[str] = []
        b = 0
        while switcher.is_alive():  # keep writing while the master changes under us
            writer.write(_keys("during", b))
            during += _keys("during", b)
            b += 1
        switcher.join(timeout=5)
        assert "error" not in result, result
        assert during, "no batch was written while the failover ran"
        new = result["new"]
        assert isinstance(new, tuple) and new != old

        after = [k for b in range(10) for k in _keys("after", b)]
        for b in range(10):
            writer.write(_keys("after", b))

        acked = before + during + after
        assert _present(new[1], acked) == acked  # nothing acknowledged was lost
        assert cluster.role(old[1]) == "slave"  # the old master now follows
        assert cluster.role(new[1]) == "master"
        # new writes went to the new master: it has them and the old node refuses writes
        assert _present(new[1], after) == after
        with _direct(old[1]) as r, pytest.raises(redis.ReadOnlyError):
            r.set("after:direct", "x")
    finally:
        client.close()


async def test_master_crash_keeps_acknowledged_writes_async_client(
    cluster: SentinelCluster,
) -> None:
    old = cluster.master()
    client = make_async_redis(_settings(cluster))
    writer = AsyncWriter(client)
    try:
        before = [k for b in range(20) for k in _keys("before", b)]
        for b in range(20):
            await writer.write(_keys("before", b))

        new = await asyncio.to_thread(cluster.kill_master)  # SIGKILL: a hard failover
        assert new != old
        # The promoted master has no replica until the crashed node comes back, so WAIT 1
        # cannot succeed: writes keep retrying while the old node rejoins as a replica.
        restart = asyncio.create_task(asyncio.to_thread(cluster.restart, old[1]))
        after = [k for b in range(10) for k in _keys("after", b)]
        for b in range(10):
            await writer.write(_keys("after", b))
        await asyncio.wait_for(restart, timeout=60)

        assert _present(new[1], before) == before  # acknowledged before the crash
        assert _present(new[1], after) == after  # new writes landed on the new master
        assert cluster.role(new[1]) == "master"
        assert cluster.role(old[1]) == "slave"
        assert writer.retries > 0  # the crash was visible to the client and survived
    finally:
        await client.aclose()

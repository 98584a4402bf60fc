"""The one place that builds Redis clients (single instance or Sentinel, sync or asyncio)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from qywx_ray.store.settings import RedisSettings


def _sentinel_hosts(settings: RedisSettings) -> list[tuple[str, int]]:
    hosts = []
    for addr in settings.sentinel_addrs:
        host, _, port = addr.rpartition(":")
        hosts.append((host or "127.0.0.1", int(port)))
    return hosts


def _common(settings: RedisSettings) -> dict[str, Any]:
    return {"socket_timeout": settings.socket_timeout_s, "password": settings.password or None}


def _pool_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """A blocking pool: when every connection is busy a caller waits (bounded), not fails."""
    return {
        **_common(settings),
        "max_connections": settings.max_connections,
        "timeout": settings.pool_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
    }


def make_redis(settings: RedisSettings) -> redis.Redis:
    """A synchronous client; in sentinel mode it follows the current master."""
    if settings.mode == "sentinel":
        sentinel = Sentinel(_sentinel_hosts(settings), **_common(settings))
        return sentinel.master_for(settings.master_name, db=settings.db, **_common(settings))
    pool = redis.BlockingConnectionPool.from_url(settings.url, **_pool_kwargs(settings))
    return redis.Redis(connection_pool=pool)


def make_async_redis(settings: RedisSettings) -> aioredis.Redis:
    """An asyncio client; in sentinel mode it follows the current master."""
    if settings.mode == "sentinel":
        sentinel = AsyncSentinel(_sentinel_hosts(settings), **_common(settings))
        return sentinel.master_for(settings.master_name, db=settings.db, **_common(settings))
    pool = aioredis.BlockingConnectionPool.from_url(settings.url, **_pool_kwargs(settings))
    return aioredis.Redis(connection_pool=pool)


def redis_address(settings: RedisSettings) -> str:
    """Where the client points, for logs and `doctor` (never includes the password)."""
    if settings.mode == "sentinel":
        return f"sentinel:{settings.master_name}@{','.join(settings.sentinel_addrs)}"
    u = urlparse(settings.url)
    return f"{u.hostname}:{u.port or 6379}/{(u.path or '/0').lstrip('/') or '0'}"

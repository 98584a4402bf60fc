"""The one place that builds Redis clients (single instance or Sentinel, sync or asyncio).

Every client rides a failover: a command that meets a transient error (connection lost or
refused, timeout, READONLY from a demoted master, NOREPLICAS from a master that lost its
replicas, no master known while the sentinels vote) reconnects and is retried with
exponential backoff within `RedisSettings.retry_budget_s` of its start; only then does
the caller see the error. Never retries an ordinary command error (WRONGTYPE, a failing
script, ...): those are bugs or data problems, not outages.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlparse

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelManagedConnection as AsyncSentinelConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from qywx_ray.store.settings import RedisSettings

T = TypeVar("T")

# Errors a command may be retried on; `is_transient_redis_error` narrows ResponseError.
_CAUGHT: tuple[type[Exception], ...] = (
    RedisConnectionError,  # includes MasterNotFoundError, BusyLoadingError
    RedisTimeoutError,
    socket.timeout,
    ReadOnlyError,
    ResponseError,
)
# Server replies meaning "not now, this node": the command did not run.
_TRANSIENT_REPLIES = ("NOREPLICAS", "MASTERDOWN", "LOADING", "TRYAGAIN")


def is_transient_redis_error(exc: BaseException) -> bool:
    """True when Redis is (momentarily) unreachable or not the writable master: an outage
    or a failover, not something wrong with the command. Callers retry these in place."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | socket.timeout | ReadOnlyError):
        return True
    if isinstance(exc, ResponseError):
        # ReadOnlyError is mapped by redis-py; NOREPLICAS (min-replicas-to-write) and
        # friends arrive as plain ResponseError, sometimes with the code stripped.
        text = str(exc)
        code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
        return code in _TRANSIENT_REPLIES or text.startswith(_TRANSIENT_REPLIES)
    return False


class _Attempts:
    """One call's retry bookkeeping, shared by the blocking and the asyncio retry: which
    errors give up at once, the failure count redis-py's `fail` callback may want, and
    the pause before the next attempt within the call's time budget."""

    def __init__(
        self,
        backoff: Any,
        budget_s: float,
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> None:
        """`is_retryable` and `with_failure_count` are redis-py's options of
        `call_with_retry`, passed through by both retries: named here only."""
        backoff.reset()
        self._backoff = backoff
        self._deadline = time.monotonic() + budget_s
        self._is_retryable = is_retryable
        self._with_failure_count = with_failure_count
        self._failures = 0

    def failed(self, error: Exception) -> tuple[Any, ...]:
        """Re-raise `error` (inside its except block) unless it is worth another attempt;
        else count it and return the arguments for redis-py's `fail` callback."""
        if not is_transient_redis_error(error) or (
            self._is_retryable is not None and not self._is_retryable(error)
        ):
            raise error
        self._failures += 1
        return (error, self._failures) if self._with_failure_count else (error,)

    def pause_s(self, error: Exception) -> float:
        """The pause before the next attempt; raises `error` once the time budget is spent."""
        left_s = self._deadline - time.monotonic()
        if left_s <= 0:
            raise error
        return float(min(self._backoff.compute(self._failures), left_s))


class _TimeBudget:
    """The constructor both retries share: exponential backoff, no count, a time budget."""

    def __init__(self, budget_s: float, base_s: float, cap_s: float) -> None:
        super().__init__(ExponentialBackoff(cap=cap_s, base=base_s), -1, _CAUGHT)  # type: ignore[call-arg]
        self.budget_s = budget_s

    def _attempts(self, *options: Any, **named: Any) -> _Attempts:
        """One call's bookkeeping; `options`/`named` are the rest of redis-py's
        `call_with_retry(do, fail, is_retryable=None, with_failure_count=False)`."""
        return _Attempts(self._backoff, self.budget_s, *options, **named)  # type: ignore[attr-defined]


class FailoverRetry(_TimeBudget, Retry):
    """redis-py Retry bounded by time (from the start of the call), not by a count, and
    retrying only transient errors. Time-bounded so that the connect retry nested inside
    a command retry does not multiply the wait."""

    def call_with_retry(
        self, do: Callable[[], T], fail: Callable[..., Any], *options: Any, **named: Any
    ) -> T:
        """`do()` until it returns, blocking between attempts (`fail` reconnects); redis-py's
        options (`is_retryable`, `with_failure_count`) go to `_Attempts`, which reads them."""
        attempts = self._attempts(*options, **named)
        while True:
            try:
                return do()
            except self._supported_errors as error:
                fail(*attempts.failed(error))
                time.sleep(attempts.pause_s(error))


class AsyncFailoverRetry(_TimeBudget, AsyncRetry):
    """The asyncio twin of FailoverRetry."""

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any], *options: Any, **named: Any
    ) -> T:
        """`await do()` until it returns, yielding between attempts (`fail` reconnects);
        the options as in `FailoverRetry.call_with_retry`."""
        attempts = self._attempts(*options, **named)
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                await fail(*attempts.failed(error))
                await asyncio.sleep(attempts.pause_s(error))


def pack_resp(encode: Callable[[Any], Any], args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol (RESP), as redis-py packs it: a first argument
    with spaces is split into words ('CONFIG GET'), every argument goes through the
    client's encoder (str, int, float; bytes as they are; bool refused).

    Why not redis-py's own packer: with hiredis installed it encodes every argument in a
    generator and packs with `hiredis.pack_command`, ~0.7 µs per short argument and ~1.5
    µs per 1 KiB one; a join of the pieces costs 0.22 / 0.36 µs (measured on a 1,500-
    argument state commit and a 500-key done-flag write). A host sends a few arguments
    per message (done-flags, batch reads, state commits), so this is per-message CPU."""
    first = args[0]
    if isinstance(first, str):
        args = (*first.encode().split(), *args[1:])
    elif b" " in first:
        args = (*first.split(), *args[1:])
    out = [b"*%d\r\n" % len(args)]
    add = out.append
    for arg in args:
        if type(arg) is not bytes:
            arg = encode(arg)
            if type(arg) is not bytes:  # a memoryview / bytearray passed through
                arg = bytes(arg)
        add(b"$%d\r\n" % len(arg))
        add(arg)
        add(b"\r\n")
    return b"".join(out)


class _RespPacker:
    """redis-py's packer interface (`pack(*args) -> list[bytes]`) over `pack_resp`."""

    def __init__(self, encode: Callable[[Any], Any]) -> None:
        self._encode = encode

    def pack(self, *args: Any) -> list[bytes]:
        return [pack_resp(self._encode, args)]


class _RespPacking:
    """Mixin for a redis-py connection class, sync or asyncio: packs with `pack_resp`.
    A sync connection's `send_command` and `pack_commands` call its packer object
    directly (hence `_construct_command_packer`); an asyncio one goes through
    `pack_command` for everything."""

    encoder: Any

    def _construct_command_packer(self, packer: Any) -> Any:
        return packer if packer is not None else _RespPacker(self.encoder.encode)

    def pack_command(self, *args: Any) -> list[bytes]:
        return [pack_resp(self.encoder.encode, args)]


@functools.cache
def _packing(connection_class: type) -> type:
    """`connection_class` (whatever a pool chose for its URL: TCP, TLS, unix socket)
    packing with `pack_resp`."""
    return type(f"Packing{connection_class.__name__}", (_RespPacking, connection_class), {})


class _FollowMasterConnection(_RespPacking, SentinelManagedConnection):
    """redis-py 8.1 reconnects a connection dropped in the middle of a command (READONLY
    from a demoted master, NOREPLICAS, a reset) straight to its last host, bypassing the
    sentinel lookup, so every retry of that command would hit the old master again. Here
    such a reconnect asks the sentinels for the current master first."""

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if retry_socket_connect and not self._sock:  # not from connect_to(): look up
            self._connect_retry()  # type: ignore[no-untyped-call]  # redis-py, untyped
            return
        super().connect_check_health(check_health, retry_socket_connect)


class _AsyncFollowMasterConnection(_RespPacking, AsyncSentinelConnection):
    """The asyncio twin of _FollowMasterConnection."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if retry_socket_connect and not self.is_connected:
            await self._connect_retry()  # type: ignore[no-untyped-call]  # redis-py, untyped
            return
        await super().connect_check_health(check_health, retry_socket_connect)


def _retry_kwargs(settings: RedisSettings, is_async: bool) -> dict[str, Any]:
    if settings.retry_budget_s <= 0:
        return {"retry": (AsyncRetry if is_async else Retry)(NoBackoff(), 0)}
    cls = AsyncFailoverRetry if is_async else FailoverRetry
    return {
        "retry": cls(
            settings.retry_budget_s, settings.retry_backoff_base_s, settings.retry_backoff_cap_s
        ),
        # What redis-py documents for riding a failover; FailoverRetry already covers
        # these, listed so a reader (and redis-py's own bookkeeping) sees them.
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ReadOnlyError],
    }


def _sentinel_hosts(settings: RedisSettings) -> list[tuple[str, int]]:
    hosts = []
    for addr in settings.sentinel_addrs:
        host, _, port = addr.rpartition(":")
        hosts.append((host or "127.0.0.1", int(port)))
    return hosts


def _common(settings: RedisSettings) -> dict[str, Any]:
    return {"socket_timeout": settings.socket_timeout_s, "password": settings.password or None}


def _sentinel_kwargs(settings: RedisSettings, is_async: bool) -> dict[str, Any]:
    """Connections to the sentinels themselves: no retry (a dead sentinel is skipped and
    the next one asked; the command's own retry repeats the whole lookup)."""
    return {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "retry": (AsyncRetry if is_async else Retry)(NoBackoff(), 0),
    }


def _pool_kwargs(settings: RedisSettings, is_async: bool) -> dict[str, Any]:
    """A blocking pool: when every connection is busy a caller waits (bounded), not fails."""
    return {
        **_common(settings),
        **_retry_kwargs(settings, is_async),
        "max_connections": settings.max_connections,
        "timeout": settings.pool_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
    }


def make_redis(settings: RedisSettings) -> redis.Redis:
    """A synchronous client; in sentinel mode it follows the current master."""
    return cast(redis.Redis, _make_client(settings, is_async=False))


def make_async_redis(settings: RedisSettings) -> aioredis.Redis:
    """An asyncio client; in sentinel mode it follows the current master."""
    return cast(aioredis.Redis, _make_client(settings, is_async=True))


def _make_client(settings: RedisSettings, is_async: bool) -> Any:
    """One recipe for both flavours; only the redis-py classes differ."""
    if settings.mode == "sentinel":
        sentinel_cls: Any = AsyncSentinel if is_async else Sentinel
        sentinel = sentinel_cls(
            _sentinel_hosts(settings),
            sentinel_kwargs=_sentinel_kwargs(settings, is_async=is_async),
            **_common(settings),
        )
        return sentinel.master_for(
            settings.master_name,
            db=settings.db,
            socket_connect_timeout=settings.socket_timeout_s,
            connection_class=(
                _AsyncFollowMasterConnection if is_async else _FollowMasterConnection
            ),
            **_common(settings),
            **_retry_kwargs(settings, is_async=is_async),
        )
    flavour: Any = aioredis if is_async else redis
    pool = flavour.BlockingConnectionPool.from_url(settings.url, **_pool_kwargs(settings, is_async))
    pool.connection_class = _packing(pool.connection_class)  # chosen by the URL's scheme
    return flavour.Redis(connection_pool=pool)


def redis_address(settings: RedisSettings) -> str:
    """Where the client points, for logs and `doctor` (never includes the password)."""
    if settings.mode == "sentinel":
        return f"sentinel:{settings.master_name}@{','.join(settings.sentinel_addrs)}"
    u = urlparse(settings.url)
    return f"{u.hostname}:{u.port or 6379}/{(u.path or '/0').lstrip('/') or '0'}"

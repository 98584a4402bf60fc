"""An in-memory Redis that runs the ingest's REAL Lua scripts (Lua 5.1 via lupa), in virtual time.

Only the commands the ingest uses (strings, counters, hashes, lists, sets, TIME, expiry),
with Redis' semantics where the scripts can see them: Lua numbers passed to redis.call
become strings the way Redis 5.1-Lua formats them (%.14g), replies convert to Lua the way
Redis converts them (nil bulk -> false, arrays -> tables, status -> {ok=...}), a script's
return value converts back (numbers truncated to integers, a table up to its first nil),
empty lists and sets disappear, expiry is by the injected clock. A script's text is the
one the ingest registered, so a defect put back into the Lua is what runs here.

`FakeRedisServer` holds the data (one per simulated cluster); `FakeRedisClient` is the
redis.asyncio surface the ingest objects call (register_script, hget, smismember,
smembers, rpush, lrange, pipeline) and routes every round trip through a `faults` hook
that can delay, fail, lose the reply of or resend it. `tests/sim_ingest/test_luaredis.py`
checks this server against a real Redis on random operation sequences.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from lupa.lua51 import LuaRuntime  # Redis embeds Lua 5.1
from redis.exceptions import ResponseError

Reply = Any
Value = bytes | list[bytes] | set[bytes] | dict[bytes, bytes]


class Status(str):
    """A status reply (+OK)."""


def _b(x: object) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, bool):
        raise ResponseError("Lua redis() command arguments must be strings or integers")
    if isinstance(x, int | float):
        return format(float(x), ".14g").encode()  # what lua_tolstring gives in Redis
    return str(x).encode()


def _int(x: bytes) -> int:
    try:
        return int(x)
    except ValueError:
        raise ResponseError("ERR value is not an integer or out of range") from None


class FakeRedisServer:
    """The data. `now_ms()` is the (virtual) clock used for TIME and expiry."""

    def __init__(self, now_ms: Callable[[], float], epoch_s: int = 1_700_000_000) -> None:
        self.now_ms = now_ms
        self.epoch_s = epoch_s
        self.data: dict[bytes, Value] = {}
        self.expire_at: dict[bytes, float] = {}
        # Called with (key, removed entries) whenever list entries leave a list.
        self.on_list_removed: Callable[[bytes, list[bytes]], None] = lambda _k, _r: None
        self.on_list_pushed: Callable[[bytes, list[bytes]], None] = lambda _k, _r: None
        # Set when a hash whose key starts with `watch_prefix` is written or deleted.
        self.watch_prefix = b"\xff"
        self.watched_dirty = False

    # ------------------------------------------------------------------ keyspace
    def _alive(self, key: bytes) -> Value | None:
        at = self.expire_at.get(key)
        if at is not None and self.now_ms() >= at:
            self._delete(key)
            return None
        return self.data.get(key)

    def _delete(self, key: bytes) -> bool:
        if key.startswith(self.watch_prefix):
            self.watched_dirty = True
        self.expire_at.pop(key, None)
        value = self.data.pop(key, None)
        if isinstance(value, list) and value:
            self.on_list_removed(key, value)
        return value is not None

    def _typed(self, key: bytes, kind: type) -> Any:
        value = self._alive(key)
        if value is not None and not isinstance(value, kind):
            raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        return value

    def delete_matching(self, prefix: bytes) -> int:
        """An operator's `DEL prefix*` (key loss)."""
        keys = [k for k in self.data if k.startswith(prefix)]
        for k in keys:
            self._delete(k)
        return len(keys)

    # ------------------------------------------------------------------ commands
    def command(self, name: str, *args: object) -> Reply:
        handler = getattr(self, f"c_{name.lower()}", None)
        if handler is None:
            raise ResponseError(f"ERR unknown command '{name}' (not in the fake)")
        return handler(*(_b(a) for a in args))

    def c_time(self) -> Reply:
        ms = self.now_ms()
        us = round(ms * 1000)
        return [str(self.epoch_s + us // 1_000_000).encode(), str(us % 1_000_000).encode()]

    def c_get(self, key: bytes) -> Reply:
        return self._typed(key, bytes)

    def c_set(self, key: bytes, value: bytes, *opts: bytes) -> Reply:
        nx = xx = False
        ttl_ms: float | None = None
        i = 0
        while i < len(opts):
            o = opts[i].upper()
            if o == b"NX":
                nx = True
            elif o == b"XX":
                xx = True
            elif o in (b"PX", b"EX"):
                n = _int(opts[i + 1])
                if n <= 0:
                    raise ResponseError("ERR invalid expire time in 'set' command")
                ttl_ms = n if o == b"PX" else n * 1000
                i += 1
            else:
                raise ResponseError("ERR syntax error")
            i += 1
        exists = self._alive(key) is not None
        if (nx and exists) or (xx and not exists):
            return None
        self.data[key] = value
        self.expire_at.pop(key, None)
        if ttl_ms is not None:
            self.expire_at[key] = self.now_ms() + ttl_ms
        return Status("OK")

    def c_del(self, *keys: bytes) -> Reply:
        return sum(1 for k in keys if self._alive(k) is not None and self._delete(k))

    def c_exists(self, *keys: bytes) -> Reply:
        return sum(1 for k in keys if self._alive(k) is not None)

    def c_pexpire(self, key: bytes, ms: bytes) -> Reply:
        if self._alive(key) is None:
            return 0
        n = _int(ms)
        if n <= 0:
            self._delete(key)
        else:
            self.expire_at[key] = self.now_ms() + n
        return 1

    def c_incrby(self, key: bytes, by: bytes) -> Reply:
        current = self._typed(key, bytes)
        n = (_int(current) if current is not None else 0) + _int(by)
        self.data[key] = str(n).encode()
        return n

    def c_incr(self, key: bytes) -> Reply:
        return self.c_incrby(key, b"1")

    def c_decrby(self, key: bytes, by: bytes) -> Reply:
        return self.c_incrby(key, str(-_int(by)).encode())

    def c_hget(self, key: bytes, field: bytes) -> Reply:
        h = self._typed(key, dict)
        return None if h is None else h.get(field)

    def c_hset(self, key: bytes, *pairs: bytes) -> Reply:
        if not pairs or len(pairs) % 2:
            raise ResponseError("ERR wrong number of arguments for 'hset' command")
        h = self._typed(key, dict)
        if key.startswith(self.watch_prefix):
            self.watched_dirty = True
        if h is None:
            h = self.data[key] = {}
        added = 0
        for f, v in zip(pairs[::2], pairs[1::2], strict=True):
            added += f not in h
            h[f] = v
        return added

    def c_llen(self, key: bytes) -> Reply:
        lst = self._typed(key, list)
        return 0 if lst is None else len(lst)

    def c_rpush(self, key: bytes, *values: bytes) -> Reply:
        lst = self._typed(key, list)
        if lst is None:
            lst = self.data[key] = []
        lst.extend(values)
        self.on_list_pushed(key, list(values))
        return len(lst)

    @staticmethod
    def _range(n: int, start: int, stop: int) -> tuple[int, int]:
        if start < 0:
            start = max(0, n + start)
        if stop < 0:
            stop = n + stop
        stop = min(stop, n - 1)
        return start, stop

    def c_lrange(self, key: bytes, start: bytes, stop: bytes) -> Reply:
        lst = self._typed(key, list) or []
        a, b = self._range(len(lst), _int(start), _int(stop))
        return list(lst[a : b + 1]) if a <= b else []

    def c_ltrim(self, key: bytes, start: bytes, stop: bytes) -> Reply:
        lst = self._typed(key, list)
        if lst is None:
            return Status("OK")
        a, b = self._range(len(lst), _int(start), _int(stop))
        kept = lst[a : b + 1] if a <= b else []
        removed = lst[:a] + (lst[b + 1 :] if a <= b else [])
        if kept:
            self.data[key] = kept
        else:
            self.data.pop(key, None)
            self.expire_at.pop(key, None)
        if removed:
            self.on_list_removed(key, removed)
        return Status("OK")

    def c_sadd(self, key: bytes, *members: bytes) -> Reply:
        s = self._typed(key, set)
        if s is None:
            s = self.data[key] = set()
        before = len(s)
        s.update(members)
        return len(s) - before

    def c_srem(self, key: bytes, *members: bytes) -> Reply:
        s = self._typed(key, set)
        if s is None:
            return 0
        before = len(s)
        s.difference_update(members)
        if not s:
            self._delete(key)
        return before - len(s)

    def c_scard(self, key: bytes) -> Reply:
        s = self._typed(key, set)
        return 0 if s is None else len(s)

    def c_smembers(self, key: bytes) -> Reply:
        s = self._typed(key, set)
        return set() if s is None else set(s)

    def c_smismember(self, key: bytes, *members: bytes) -> Reply:
        s = self._typed(key, set) or set()
        return [1 if m in s else 0 for m in members]

    # ------------------------------------------------------------------ Lua
    def eval(self, script: str, keys: Sequence[object], args: Sequence[object]) -> Reply:
        """EVAL: run `script` atomically with KEYS and ARGV; returns the converted reply."""
        return _LUA.run(self, script, [_b(k) for k in keys], [_b(a) for a in args])


class _Lua:
    """One Lua 5.1 runtime per process; scripts compiled once, bound to a server per call."""

    def __init__(self) -> None:
        self.rt = LuaRuntime(encoding=None, unpack_returned_tuples=False)
        self.server: FakeRedisServer | None = None
        self.compiled: dict[str, Any] = {}
        g = self.rt.globals()
        g.redis = self.rt.table_from(
            {
                b"call": self._call,
                b"pcall": self._pcall,
                b"sha1hex": lambda s: hashlib.sha1(_b(s)).hexdigest().encode(),
                b"status_reply": lambda s: self.rt.table_from({b"ok": s}),
                b"error_reply": lambda s: self.rt.table_from({b"err": s}),
            }
        )

    def _to_lua(self, reply: Reply) -> Any:
        if reply is None:
            return False
        if isinstance(reply, Status):
            return self.rt.table_from({b"ok": reply.encode()})
        if isinstance(reply, bool):
            return int(reply)
        if isinstance(reply, int | bytes):
            return reply
        if isinstance(reply, list | set):
            items = sorted(reply) if isinstance(reply, set) else reply
            return self.rt.table_from([self._to_lua(x) for x in items])
        raise TypeError(f"cannot convert {reply!r}")

    def _call(self, name: object, *args: object) -> Any:
        assert self.server is not None
        return self._to_lua(self.server.command(_b(name).decode(), *(_b(a) for a in args)))

    def _pcall(self, name: object, *args: object) -> Any:
        try:
            return self._call(name, *args)
        except ResponseError as exc:
            return self.rt.table_from({b"err": str(exc).encode()})

    def _from_lua(self, value: Any) -> Reply:
        if value is None or value is False:
            return None
        if value is True:
            return 1
        if isinstance(value, float):
            return int(value)
        if isinstance(value, int | bytes):
            return value
        ok, err = value[b"ok"], value[b"err"]
        if err is not None:
            raise ResponseError(err.decode() if isinstance(err, bytes) else str(err))
        if ok is not None:
            return Status(ok.decode() if isinstance(ok, bytes) else str(ok))
        out = []
        i = 1
        while value[i] is not None:
            out.append(self._from_lua(value[i]))
            i += 1
        return out

    def run(
        self, server: FakeRedisServer, script: str, keys: list[bytes], argv: list[bytes]
    ) -> Reply:
        fn = self.compiled.get(script)
        if fn is None:
            fn = self.compiled[script] = self.rt.eval(f"function(KEYS, ARGV)\n{script}\nend")
        self.server = server
        try:
            result = fn(self.rt.table_from(keys), self.rt.table_from(argv))
        except ResponseError:
            raise
        except Exception as exc:  # a Lua runtime error: Redis answers an error reply
            raise ResponseError(f"ERR Error running script: {exc}") from exc
        finally:
            self.server = None
        return self._from_lua(result)


_LUA = _Lua()

# --------------------------------------------------------------------------- client

# faults(node, apply) -> the reply: it may delay, raise before or after apply(), or
# call apply() twice (a resend after a lost reply).
FaultHook = Callable[[Callable[[], Reply]], Awaitable[Reply]]


class _Script:
    def __init__(self, client: FakeRedisClient, text: str) -> None:
        self.client = client
        self.text = text

    async def __call__(
        self, keys: Sequence[object] = (), args: Sequence[object] = (), client: Any = None
    ) -> Reply:
        server = self.client.server
        return await self.client.round_trip(lambda: server.eval(self.text, keys, args))


class _Pipeline:
    def __init__(self, client: FakeRedisClient) -> None:
        self.client = client
        self.ops: list[tuple[str, tuple[bytes, ...]]] = []

    async def __aenter__(self) -> _Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.ops.clear()

    def _add(self, name: str, *args: object) -> _Pipeline:
        self.ops.append((name, tuple(_b(a) for a in args)))
        return self

    def lrange(self, key: str, start: int, stop: int) -> _Pipeline:
        return self._add("LRANGE", key, start, stop)

    def get(self, key: str) -> _Pipeline:
        return self._add("GET", key)

    def scard(self, key: str) -> _Pipeline:
        return self._add("SCARD", key)

    async def execute(self) -> list[Reply]:
        ops, server = list(self.ops), self.client.server
        return await self.client.round_trip(  # type: ignore[no-any-return]
            lambda: [server.command(name, *args) for name, args in ops]
        )


class FakeRedisClient:
    """The part of redis.asyncio.Redis the ingest objects use; one per simulated node."""

    def __init__(self, server: FakeRedisServer, faults: FaultHook | None = None) -> None:
        self.server = server
        self.faults = faults

    async def round_trip(self, apply: Callable[[], Reply]) -> Reply:
        if self.faults is None:
            return apply()
        return await self.faults(apply)

    def register_script(self, text: str) -> _Script:
        return _Script(self, text)

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self)

    async def _cmd(self, name: str, *args: object) -> Reply:
        server, bargs = self.server, tuple(_b(a) for a in args)
        return await self.round_trip(lambda: server.command(name, *bargs))

    async def hget(self, key: str, field: str) -> Reply:
        return await self._cmd("HGET", key, field)

    async def smismember(self, key: str, members: Sequence[str]) -> Reply:
        return await self._cmd("SMISMEMBER", key, *members)

    async def smembers(self, key: str) -> Reply:
        return await self._cmd("SMEMBERS", key)

    async def rpush(self, key: str, *values: object) -> Reply:
        return await self._cmd("RPUSH", key, *values)

    async def lrange(self, key: str, start: int, stop: int) -> Reply:
        return await self._cmd("LRANGE", key, start, stop)

"""Per-user state (`ctx.state`): loaded on activation, committed exactly once with the done-flag.

What a handler sees. A handler that declares state (`@stateful()` for a JSON mapping,
`@stateful(MyModel)` for a pydantic model) gets `ctx.state`: its own copy of the user's
committed state for every attempt (the object the previous successful attempt left, or
decoded afresh from the committed bytes after a failure), which it may mutate or replace
(`ctx.state = ...`); it must not keep a reference to it after returning. Only if the
handler succeeds does the runtime keep the new value (in memory at once, in Redis with
the message's done-flag). A failed, timed-out or infra-retried attempt leaves no trace:
its copy is thrown away, so the next message (or the retry) sees the state as it was
before the failed attempt.

Lifecycle. The state is loaded when the user's mailbox activates (hosted or dedicated
mode: the same HostCore), for all users activated in the same loop tick in ONE Redis round
trip (`StateLoader`), kept on the mailbox while it lives and dropped with it on idle
expiry. A successor mailbox starts only after its predecessor is dead, i.e. after every
commit of the predecessor is durable, so it always loads the newest state.

Exactly once. After a handler succeeds, its state change and its done-flag are written by
ONE Lua call (`COMMIT_LUA`, batched per flush like the plain done-flags,
dedup.Deduplicator). The message completes (its Kafka offset may commit) only once that
call answered. A crash before it: neither is written, the message is re-run against the
old state. After it: the done-flag skips the message. So a state change is applied exactly
once, even though the handler may run twice; side effects outside the state remain
at-least-once (make them idempotent, e.g. kf/send_msg with a msgid derived from the
input message's id).

Versions. Each user's state carries a version. Layout: `qywx:state:{user}` is ONE string,
the version as 20 zero-padded decimal digits followed by the encoded state (`pack_state`):
the commit reads the version with GETRANGE (20 bytes, whatever the state's size) and
writes version, state and TTL with one SET ... EX. Before, it was a hash (`v`, `data`):
a 1 KiB field made Redis convert it to a real hash table, and the write took HSET and
EXPIRE (measured, bench_host_cpu --redis --state-bytes 1024: Redis CPU per message with
state on minus off +11.9 -> +10.4 µs, together with one script argument per write
instead of four, see COMMIT_LUA). Old hashes stay readable:
the load, the commit's version check and the admin routes read either type, and the
first commit of a user rewrites its hash as a string (migrated on write; never both). A
commit is conditional: it applies only if the stored version equals the version the
host's copy was derived from, and only if the message is not already done. Several
commits of one user in one flush chain (v -> v+1 -> ...) and are sent as ONE conditional
write (`group_writes`): the last state and all their done-flags, checked against the
first expected version, all or nothing; the intermediate states are never sent (nobody
could read them between two writes of the same call). Once a group is refused, every
later one of that user in the flush is refused too (they ran on the refused state). A
refused commit means another writer moved the state (a second host after a rebalance
race, an admin DELETE) or the message was already applied (by another host, after this
host's dedup check): the host never completes the message and restarts (crash-only,
`on_fatal`), so it is re-delivered and re-run against the stored state. A stale writer
can therefore never overwrite a newer state: no lost update, no double application.

Redis down. A state cannot be made durable without Redis, so for stateful handlers the
done-flag check, the load and the commit are retried with backoff whatever
`consume.redis_down_policy` says (the user waits, in order, in memory; its offsets do not
commit). Policy `process` keeps its meaning for protection and for stateless handlers.
Running a handler against a missing or defaulted state would silently fork the user's
state: we refuse that. So would running a done message (re-delivered after a crash that
followed its commit) against a loaded state that holds its change: the user's next
messages would start from the doubled state (`Deduplicator.require_checks`).

DLQ retries. A retry runs through the user's mailbox like any message, against the state
as it is when it runs. For a failure that parks the user (the default for retryable
reasons, dlq.parking), nothing of that user runs between the failure and the retry: the
retry sees exactly the state the failed attempt saw (its mutations were discarded) and
applies once, in Kafka order. For a reason that does not park (e.g. `rate_limited` when
so configured), later messages run meanwhile and the retry applies at the time it
succeeds; its state is then the fold in handling order, not Kafka order.

Size and TTL. The encoded state may not exceed `consume.state_max_bytes`: a success
whose new state is larger is a dead letter `state_too_large` (never truncated; the old
state stays). The key expires `consume.state_ttl_s` (default 30 days) after its last
change.

Never: complete a message of a stateful handler before its state commit is durable; keep
a failed attempt's mutations; write a state whose version was not the one it was
derived from.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import orjson
from pydantic import BaseModel

from qywx_ray.errors import QywxError
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter
from qywx_ray.reasons import FailureReason
from qywx_ray.retry import capped_exponential, retry_async

log = get_logger(__name__)

STATE_KEY = "qywx:state:{}"
VERSION_DIGITS = 20  # the stored value: version (zero-padded decimal) + encoded state
REASON_STATE_TOO_LARGE: str = FailureReason.STATE_TOO_LARGE.value  # plain str, as types.REASON_*
DEFAULT_STATE_TTL_S = 30 * 86_400
DEFAULT_STATE_MAX_BYTES = 64 * 1024

m_state_loads = counter("qywx_state_loads_total", "User states loaded on activation")
m_state_conflicts = counter(
    "qywx_state_conflicts_total", "State commits refused (stale version or already done)"
)
m_state_too_large = counter(
    "qywx_state_too_large_total", "Handler successes dead-lettered: state over the size limit"
)


class StateTooLarge(QywxError):
    """The new state exceeds `consume.state_max_bytes` (dead letter `state_too_large`)."""


class StateUnavailable(Exception):
    """The state store cannot be reached."""


# ---------------------------------------------------------------- declaration


@dataclass(frozen=True)
class StateSpec:
    """What a stateful handler declared: None = a JSON mapping, else its pydantic model."""

    model: type[BaseModel] | None = None

    def decode(self, raw: bytes) -> Any:
        """A fresh object for one attempt (never shared with the committed copy)."""
        if self.model is None:
            return decode_json(raw) if raw else {}
        if not raw:
            return self.model()
        return self.model.model_validate_json(raw)

    def encode(self, value: Any) -> bytes:
        if self.model is not None:
            if not isinstance(value, self.model):
                raise TypeError(f"ctx.state must be a {self.model.__name__}")
            return value.model_dump_json().encode()
        if not isinstance(value, dict):
            raise TypeError("ctx.state must be a JSON mapping (dict)")
        return encode_json(value)


def encode_json(value: dict[Any, Any]) -> bytes:
    """A JSON mapping's bytes: orjson (compact UTF-8, ~10x the stdlib's speed for a 1 KiB
    state), with the stdlib as the fallback for what orjson refuses (integers beyond
    64 bits). What orjson changes against `json.dumps`: NaN and ±Infinity become `null`
    (the stdlib wrote the non-JSON `NaN`), and it also accepts UUIDs, datetimes, dates,
    times, enums and dataclasses (as strings / ISO 8601 / their value / objects) where the
    stdlib raised; non-string keys are stringified as before. Everything the stdlib
    accepted decodes to the same value (floats may be spelled differently: `1e16`)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def decode_json(raw: bytes) -> Any:
    """orjson, with the stdlib for what it refuses: a state written before orjson may hold
    `NaN` / `Infinity` literals, and integers beyond 64 bits."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def stateful(model: type[BaseModel] | None = None) -> Callable[[Any], Any]:
    """Declare that a handler uses `ctx.state` (a dict, or an instance of `model`).

    State is off unless declared: a host whose handler does not declare it pays nothing
    (no load, no extra Redis work in the commit). Declaring, rather than loading lazily
    on first access, lets the runtime load every newly active user of a batch in one
    round trip before their handlers start, and works the same for sync handlers running
    in threads (which cannot await a lazy load)."""

    def mark(fn: Any) -> Any:
        fn.__qywx_state__ = StateSpec(model)
        return fn

    return mark


def counts_messages(fn: Any) -> Any:
    """Declare that the handler's state keeps `messages` (how many messages it applied)
    and `last_msgid` (the last one): `qywx-ray demo`'s audit then checks every customer's
    final state against WeCom's record (each processed message applied exactly once)."""
    fn.__qywx_audit_state__ = True
    return fn


def state_spec(handler: Any) -> StateSpec | None:
    spec = getattr(handler, "__qywx_state__", None)
    return spec if isinstance(spec, StateSpec) else None


# ---------------------------------------------------------------- in memory


@dataclass
class StateSlot:
    """A user's committed state as this host knows it: the version it derives from and
    its bytes (b"" = none yet). Lives on the mailbox; dropped with it.

    `value` caches the decoded object a successful attempt left (equal to `raw`), so the
    next attempt takes it instead of decoding again; taking it empties the cache, so an
    attempt that fails (and may have mutated it) leaves the next one to decode `raw`."""

    version: int
    raw: bytes
    value: Any = field(default=None, compare=False, repr=False)

    def take(self, spec: StateSpec) -> Any:
        """The object for one attempt: the cached one, or a fresh decode of `raw`."""
        value, self.value = self.value, None
        return value if value is not None else spec.decode(self.raw)


class StateWrite(NamedTuple):
    """One message's state commit: applies only at `expected_version` and while the
    message is not done; `data` None = unchanged (version checked, not bumped). A named
    tuple: one is built per message on the hosts' hot path (a frozen dataclass costs
    three times as much to build)."""

    user: str
    expected_version: int
    data: bytes | None


def next_write(
    spec: StateSpec, slot: StateSlot, user: str, new_value: Any, max_bytes: int
) -> StateWrite:
    """The commit for a successful attempt; advances `slot` to the new state.

    Raises StateTooLarge (slot untouched) or TypeError (the handler put something that is
    not its declared state into ctx.state: slot untouched)."""
    raw = spec.encode(new_value)
    if len(raw) > max_bytes:
        raise StateTooLarge(f"state of {len(raw)} bytes exceeds the limit of {max_bytes}")
    if raw == slot.raw:
        slot.value = new_value
        return StateWrite(user, slot.version, None)
    write = StateWrite(user, slot.version, raw)
    slot.version += 1
    slot.raw = raw
    slot.value = new_value
    return write


@dataclass(slots=True)
class WriteGroup:
    """One user's successive state writes within one flush, committed as ONE conditional
    write: applies only at `expected_version` (the first write's) and while none of
    `message_ids` is done; then every done-flag and the last changed state `data` (None:
    none changed) at `new_version`. All or nothing: the intermediate states are never
    sent, since nobody can read them between two writes of the same call anyway."""

    user: str
    expected_version: int
    new_version: int
    data: bytes | None
    message_ids: list[str]


def group_writes(writes: Sequence[tuple[str, StateWrite]]) -> list[WriteGroup]:
    """The groups of a flush's writes, in order of each group's first write. A write joins
    its user's open group when it chains on it (its expected version is the group's new
    version, which is how a host's successive commits look); otherwise (a reload in
    between) it opens a new group of that user, which the store refuses if the earlier
    one was refused."""
    groups: list[WriteGroup] = []
    open_: dict[str, WriteGroup] = {}
    for mid, w in writes:
        g = open_.get(w.user)
        if g is None or g.new_version != w.expected_version:
            g = open_[w.user] = WriteGroup(w.user, w.expected_version, w.expected_version, None, [])
            groups.append(g)
        g.message_ids.append(mid)
        if w.data is not None:
            g.data = w.data
            g.new_version += 1
    return groups


# ---------------------------------------------------------------- stores


class StateStore(Protocol):
    async def load(self, users: Sequence[str]) -> dict[str, StateSlot]:
        """Every user's committed state (version 0, b"" when none); one round trip."""
        ...


# Per key: its version and encoded state ('0', '' when none); a string (the layout) or a
# hash of the old layout (a GET on it is a WRONGTYPE error: pcall, then HMGET).
LOAD_LUA = """
local out = {}
for i = 1, #KEYS do
  local s = redis.pcall('GET', KEYS[i])
  if type(s) == 'table' then
    local got = redis.call('HMGET', KEYS[i], 'v', 'data')
    out[#out + 1] = got[1] or '0'
    out[#out + 1] = got[2] or ''
  elseif s then
    out[#out + 1] = string.sub(s, 1, 20)
    out[#out + 1] = string.sub(s, 21)
  else
    out[#out + 1] = '0'
    out[#out + 1] = ''
  end
end
return out
"""


def pack_state(version: int, data: bytes) -> bytes:
    """The stored value of a user's state (see the module doc: Versions)."""
    return b"%020d" % version + data


def parse_loaded(users: Sequence[str], got: Sequence[Any]) -> dict[str, StateSlot]:
    """LOAD_LUA's answer (version, state per key, in `users` order) as slots."""
    out: dict[str, StateSlot] = {}
    for i, user in enumerate(users):
        v, data = got[2 * i], got[2 * i + 1]
        raw = data.encode() if isinstance(data, str) else bytes(data)
        out[user] = StateSlot(int(v or 0), raw)
    return out


# One flush's state writes, grouped (`group_writes`): KEYS: the call's op key, the plain
# done keys (ARGV[1] of them), then per group: the state key, then the group's done keys.
# ARGV: n_plain, done_ttl_s, state_ttl_s, the groups' heads ("<expected version> <number
# of done keys>" each, joined by commas), then ONE per group: the value to store,
# `pack_state(new version, its last state)`, or "" when the state did not change (the
# version stays). The heads travel together and each value alone, so the script stores
# an argument as it came: it never cuts a 1 KiB value out of a longer string (measured,
# bench_state_commit: Redis ~2 µs less per group than one "head + value" argument each);
# a group still costs the client one packed argument besides its keys (not four: ~0.2-0.4
# µs each with store.client.pack_resp, more with redis-py's own packer).
# `version` reads the stored version: 20 bytes of the string, or `v` of an old-layout
# hash (GETRANGE on a hash is a WRONGTYPE error); SET replaces either (migrated on write).
# A group applies whole or not at all: the stored version must be the expected one (checked
# first) and none of its messages done: each done-flag is set only if absent (SET NX, one
# command per message, where an EXISTS check before the writes took two), and one that is
# already there deletes the flags the group set before it; then its last state at the new
# version. Once a group of a user is refused, every later group of that user in the call
# is refused too (they ran on its state).
# Returns the 1-based indexes of the refused groups. The answer is kept under the op key
# (for done_ttl_s): a resend of the same call after a lost reply gets the first answer and
# applies nothing again.
COMMIT_LUA = """
local function version(skey)
  local head = redis.pcall('GETRANGE', skey, 0, 19)
  if type(head) == 'table' then return tonumber(redis.call('HGET', skey, 'v') or '0') end
  return tonumber(head) or 0
end
local op = redis.call('GET', KEYS[1])
if op then
  local out = {}
  for i in string.gmatch(op, '%d+') do out[#out + 1] = tonumber(i) end
  return out
end
local n_plain = tonumber(ARGV[1])
for i = 2, n_plain + 1 do redis.call('SET', KEYS[i], '1', 'EX', ARGV[2]) end
local broken, out = {}, {}
local k, a, g = n_plain + 2, 5, 0
for expected, n in string.gmatch(ARGV[4], '(%-?%d+) (%d+)') do
  g = g + 1
  expected, n = tonumber(expected), tonumber(n)
  local skey = KEYS[k]
  local ok = not broken[skey] and version(skey) == expected
  if ok then  -- each flag only if absent (check and write in one command); one already
    for i = k + 1, k + n do  -- there (or twice in the group) undoes the group's own
      if not redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[2]) then
        for j = k + 1, i - 1 do redis.call('DEL', KEYS[j]) end
        ok = false
        break
      end
    end
  end
  if ok then
    if ARGV[a] ~= '' then redis.call('SET', skey, ARGV[a], 'EX', ARGV[3]) end
  else
    broken[skey] = true
    out[#out + 1] = g
  end
  k = k + 1 + n
  a = a + 1
end
redis.call('SET', KEYS[1], 'r' .. table.concat(out, ','), 'EX', ARGV[2])
return out
"""
COMMIT_OP_KEY = "qywx:state-commit:{}"


class RedisStateStore:
    """`qywx:state:{user}` (version + state; old hashes read too): one Lua call loads a
    whole batch of users."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    async def load(self, users: Sequence[str]) -> dict[str, StateSlot]:
        if not users:
            return {}
        try:
            got = await self._redis.eval(
                LOAD_LUA, len(users), *[STATE_KEY.format(u) for u in users]
            )
        except Exception as exc:  # redis.RedisError, OSError, timeouts
            raise StateUnavailable(str(exc)) from exc
        return parse_loaded(users, got)


class MemoryStateStore:
    """A DoneStore with commits and a StateStore, in memory, for unit tests (COMMIT_LUA's
    semantics); `down=True` simulates an outage."""

    def __init__(self) -> None:
        self.states: dict[str, StateSlot] = {}
        self.done: set[str] = set()
        self.down = False
        self.loads: list[list[str]] = []
        self.commits = 0
        self.refused: list[str] = []
        self.ops: dict[str, set[str]] = {}
        self.fail_commits = False  # only commits fail (a crash window after the handler)

    def _check(self) -> None:
        if self.down:
            from qywx_ray.consume.dedup import DedupUnavailable

            raise DedupUnavailable("memory store down")

    async def load(self, users: Sequence[str]) -> dict[str, StateSlot]:
        if self.down:
            raise StateUnavailable("memory store down")
        self.loads.append(list(users))
        return {
            u: StateSlot(s.version, s.raw) if (s := self.states.get(u)) else StateSlot(0, b"")
            for u in users
        }

    async def done_among(self, message_ids: Sequence[str]) -> set[str]:
        self._check()
        return {m for m in message_ids if m in self.done}

    async def mark_done(self, message_ids: Sequence[str]) -> None:
        self._check()
        self.done.update(message_ids)

    async def commit(
        self, message_ids: Sequence[str], writes: Sequence[tuple[str, StateWrite]], op_id: str
    ) -> set[str]:
        self._check()
        if self.fail_commits:
            from qywx_ray.consume.dedup import DedupUnavailable

            raise DedupUnavailable("memory store: commit refused by the test")
        if op_id in self.ops:  # a resend after a lost reply: the first answer
            return self.ops[op_id]
        self.commits += 1
        self.done.update(message_ids)
        refused: set[str] = set()
        broken: set[str] = set()
        for g in group_writes(writes):
            cur = self.states.get(g.user, StateSlot(0, b""))
            if (
                g.user in broken
                or cur.version != g.expected_version
                or len(set(g.message_ids)) != len(g.message_ids)
                or any(m in self.done for m in g.message_ids)
            ):
                broken.add(g.user)
                refused.update(g.message_ids)
                continue
            if g.new_version != g.expected_version:
                assert g.data is not None
                self.states[g.user] = StateSlot(g.new_version, g.data)
            self.done.update(g.message_ids)
        self.refused.extend(sorted(refused))
        self.ops[op_id] = refused
        return refused


def commit_args(
    op_id: str,
    done_keys: Sequence[str],
    writes: Sequence[tuple[str, StateWrite]],
    done_key: Callable[[str], str],
    done_ttl_s: int,
    state_ttl_s: int,
) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of COMMIT_LUA for a flush: its plain done keys and its writes, grouped
    as `group_writes` groups them (the script's answer names groups by their index in
    that order). The common flush, one write per user, is built in one pass without the
    group objects: the same arguments (tests/unit/test_consume_state.py), ~1 µs less per
    message on the hosts' hot path."""
    if len({w.user for _, w in writes}) != len(writes):
        return group_args(op_id, done_keys, group_writes(writes), done_key, done_ttl_s, state_ttl_s)
    keys: list[Any] = [COMMIT_OP_KEY.format(op_id).encode(), *done_keys]
    heads: list[bytes] = []
    values: list[bytes] = []
    for mid, w in writes:  # each its own group: one done key, version +1 if it changed
        keys.append(STATE_KEY.format(w.user).encode())
        keys.append(done_key(mid).encode())
        heads.append(b"%d 1" % w.expected_version)
        values.append(b"" if w.data is None else pack_state(w.expected_version + 1, w.data))
    return keys, _argv(len(done_keys), done_ttl_s, state_ttl_s, heads, values)


def group_args(
    op_id: str,
    done_keys: Sequence[str],
    groups: Sequence[WriteGroup],
    done_key: Callable[[str], str],
    done_ttl_s: int,
    state_ttl_s: int,
) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of COMMIT_LUA for these groups, all bytes: store.client.pack_resp
    takes bytes as they are and sends anything else through the client's encoder."""
    keys: list[Any] = [COMMIT_OP_KEY.format(op_id).encode(), *done_keys]
    heads: list[bytes] = []
    values: list[bytes] = []
    for g in groups:
        keys.append(STATE_KEY.format(g.user).encode())
        keys += [done_key(m).encode() for m in g.message_ids]
        heads.append(b"%d %d" % (g.expected_version, len(g.message_ids)))
        values.append(pack_state(g.new_version, g.data) if g.data is not None else b"")
    return keys, _argv(len(done_keys), done_ttl_s, state_ttl_s, heads, values)


def _argv(
    n_plain: int, done_ttl_s: int, state_ttl_s: int, heads: list[bytes], values: list[bytes]
) -> list[Any]:
    return [b"%d" % n_plain, b"%d" % done_ttl_s, b"%d" % state_ttl_s, b",".join(heads), *values]


class StateLoader:
    """Coalesces activation loads: every user asked for in the same loop tick is loaded
    with one `StateStore.load` (one Redis round trip per delivery batch's new users, not
    one per user). Retried until it succeeds whatever the Redis-down policy: a handler
    never runs against a missing state."""

    def __init__(self, store: StateStore, retry_max_s: float = 5.0) -> None:
        self.store = store
        self._retry_max_s = retry_max_s
        self._wanted: dict[str, asyncio.Future[StateSlot]] = {}
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self.round_trips = 0

    async def get(self, user: str) -> StateSlot:
        fut = self._wanted.get(user)
        if fut is None:
            fut = self._wanted[user] = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._load())
        return await asyncio.shield(fut)

    def load_now(self, users: Sequence[str]) -> dict[str, asyncio.Future[StateSlot]]:
        """Start one load for `users` at once (a delivery batch's newly activated
        mailboxes); each future resolves with its user's slot."""
        loop = asyncio.get_running_loop()
        futures = {u: loop.create_future() for u in users}
        task = loop.create_task(self._load_batch(futures))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)
        return futures

    async def _load(self) -> None:
        # Let every worker woken by the same ingest ask first (two ticks: a worker's
        # step may be scheduled one iteration after the put that woke it).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        while self._wanted:
            wanted, self._wanted = self._wanted, {}
            await self._load_batch(wanted)

    async def _load_batch(self, wanted: dict[str, asyncio.Future[StateSlot]]) -> None:
        async def load() -> dict[str, StateSlot]:
            self.round_trips += 1
            return await self.store.load(list(wanted))

        def on_retry(exc: BaseException, _attempt: int, delay_s: float) -> None:
            log.warning("state.load_retry", users=len(wanted), delay_s=delay_s, error=str(exc))

        slots = await retry_async(
            load,
            retry_on=(StateUnavailable,),
            wait=capped_exponential(0.05, self._retry_max_s),
            on_retry=on_retry,
        )
        m_state_loads.inc(len(wanted))
        for user, fut in wanted.items():
            if not fut.done():
                fut.set_result(slots[user])

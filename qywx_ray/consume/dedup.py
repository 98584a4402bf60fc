"""Done-flags: a message whose handler succeeded is never handled again (24 h window).

Flags are written only AFTER the handler succeeded (never before: a failed handler must
be retried), one pipeline per batch; checked once per delivery batch. A recent-done LRU in
memory answers most re-deliveries without Redis. This module never reports a message done
before its flag is durable (policy `stop`); with policy `process` Redis trouble is counted
and processing continues without dedup. A done-flag that carries a state change
(consume/state.py) is written by the same Lua call as the change, conditional on the
state's version, and is never bypassed: it is retried whatever the policy.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter
from qywx_ray.retry import capped_exponential, retry_async

if TYPE_CHECKING:
    from qywx_ray.consume.state import StateWrite

T = TypeVar("T")

log = get_logger(__name__)

DONE_KEY = "qywx:done:{}"

dedup_bypassed = counter(
    "qywx_dedup_bypassed_total", "Messages handled without a dedup check (Redis down)"
)
dedup_hits = counter("qywx_dedup_hits_total", "Re-delivered messages skipped because already done")


_EXISTS_LUA = """
local out = {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then out[#out + 1] = i end
end
return out
"""

_MARK_LUA = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], '1', 'EX', ARGV[1]) end
return #KEYS
"""


class DedupUnavailable(Exception):
    """The done-flag store cannot be reached."""


class DoneStore(Protocol):
    async def done_among(self, message_ids: Sequence[str]) -> set[str]: ...

    async def mark_done(self, message_ids: Sequence[str]) -> None: ...


class StateCommitStore(DoneStore, Protocol):
    """A DoneStore that also writes state changes with their done-flags, atomically."""

    async def commit(
        self, message_ids: Sequence[str], writes: Sequence[tuple[str, StateWrite]], op_id: str
    ) -> set[str]:
        """Done-flags for `message_ids`, and for each (message id, write) the write and
        its done-flag, all in one atomic step; returns the message ids whose write was
        refused (stale version, or already done): neither written for those. A resend
        with the same `op_id` returns the first answer and applies nothing."""
        ...


class MemoryDoneStore:
    """In-memory DoneStore for unit tests; `down=True` simulates an outage."""

    def __init__(self) -> None:
        self.done: set[str] = set()
        self.down = False
        self.checks = 0
        self.writes = 0

    async def done_among(self, message_ids: Sequence[str]) -> set[str]:
        if self.down:
            raise DedupUnavailable("memory store down")
        self.checks += 1
        return {m for m in message_ids if m in self.done}

    async def mark_done(self, message_ids: Sequence[str]) -> None:
        if self.down:
            raise DedupUnavailable("memory store down")
        self.writes += 1
        self.done.update(message_ids)


class RedisDoneStore:
    """`qywx:done:{message_id}` with TTL; one pipeline round trip per call."""

    def __init__(self, redis: Any, ttl_s: int, state_ttl_s: int = 30 * 86_400) -> None:
        self._redis = redis  # redis.asyncio.Redis
        self._ttl_s = ttl_s
        self._state_ttl_s = state_ttl_s
        self._commit_script: Any = None  # registered on first use (EVALSHA)

    async def done_among(self, message_ids: Sequence[str]) -> set[str]:
        # One command per batch answering only the (few) 1-based indexes that exist.
        if not message_ids:
            return set()
        found: set[str] = set()
        try:
            for i in range(0, len(message_ids), 5000):
                chunk = message_ids[i : i + 5000]
                hits = await self._redis.eval(
                    _EXISTS_LUA, len(chunk), *[DONE_KEY.format(m) for m in chunk]
                )
                found.update(chunk[int(h) - 1] for h in hits)
        except Exception as exc:  # redis.RedisError, OSError, timeouts
            raise DedupUnavailable(str(exc)) from exc
        return found

    async def mark_done(self, message_ids: Sequence[str]) -> None:
        # One command per batch (a pipeline of SETs costs a reply parse per message).
        if not message_ids:
            return
        try:
            for i in range(0, len(message_ids), 5000):
                chunk = message_ids[i : i + 5000]
                await self._redis.eval(
                    _MARK_LUA, len(chunk), *[DONE_KEY.format(m) for m in chunk], self._ttl_s
                )
        except Exception as exc:
            raise DedupUnavailable(str(exc)) from exc

    async def commit(
        self, message_ids: Sequence[str], writes: Sequence[tuple[str, StateWrite]], op_id: str
    ) -> set[str]:
        """One COMMIT_LUA call for a flush: plain done-flags, then each user's writes as
        one group (state.group_writes: its last state and all its done-flags, or nothing);
        a retry after a lost reply reuses `op_id` and gets the answer the first call
        recorded. EVALSHA: the script's text is sent once per Redis (NOSCRIPT: loaded)."""
        from qywx_ray.consume.state import COMMIT_LUA, commit_args, group_writes

        if self._commit_script is None:
            self._commit_script = self._redis.register_script(COMMIT_LUA)
        keys, argv = commit_args(
            op_id,
            [DONE_KEY.format(m) for m in message_ids],
            writes,
            DONE_KEY.format,
            self._ttl_s,
            self._state_ttl_s,
        )
        try:
            refused = await self._commit_script(keys=keys, args=argv)
        except Exception as exc:
            raise DedupUnavailable(str(exc)) from exc
        if not refused:
            return set()
        groups = group_writes(writes)  # the order the script's answer refers to
        return {m for i in refused for m in groups[int(i) - 1].message_ids}


class RecentDone:
    """Bounded LRU of message ids whose done-flag is durable."""

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, message_id: str) -> None:
        self._ids[message_id] = None
        self._ids.move_to_end(message_id)
        while len(self._ids) > self._max:
            self._ids.popitem(last=False)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class _Mark(NamedTuple):
    message_id: str  # "": a `flushed` marker
    on_durable: Callable[[], None]
    state: StateWrite | None
    on_refused: Callable[[], None] | None


class Deduplicator:
    """Batch check and batched, durable mark-done over a DoneStore, with retry policy."""

    def __init__(
        self,
        store: DoneStore,
        *,
        policy: str = "stop",
        recent_size: int = 100_000,
        retry_max_s: float = 5.0,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.policy = policy
        self.recent = RecentDone(recent_size)
        self._retry_max_s = retry_max_s
        self._sleep = sleep
        self._to_mark: list[_Mark] = []
        self._flusher: asyncio.Task[None] | None = None
        self.redis_ok = True
        self.checks_bypassable = True  # policy process may skip a check (not: stateful)

    def require_checks(self) -> None:
        """Never bypass a done-flag check, whatever the policy: retry it until the store
        answers. For a stateful handler (consume/state.py): a re-delivered message that is
        already done would otherwise run against a state loaded with its change in it, and
        the user's next messages would start from that doubled state before its commit is
        refused. Its state load and commit wait for Redis anyway, so a bypass saved nothing."""
        self.checks_bypassable = False

    async def already_done(self, message_ids: Sequence[str]) -> set[str]:
        """Ids already done (LRU first, then one store round trip for the rest).

        Policy stop: retries with backoff while the store is down (the caller waits, so
        nothing completes and commits do not advance). Policy process: returns what the
        LRU knows and counts the rest as bypassed (not after `require_checks`: retried).
        """
        known = {m for m in message_ids if m in self.recent}
        rest = [m for m in message_ids if m not in known]
        if not rest:
            dedup_hits.inc(len(known))
            return known

        async def check() -> set[str]:
            return await self._reporting(self.store.done_among(rest))

        if self.policy == "process" and self.checks_bypassable:
            try:
                found = await check()
            except DedupUnavailable as exc:
                dedup_bypassed.inc(len(rest))
                log.warning("dedup.bypassed", count=len(rest), error=str(exc))
                found = set()
        else:
            found = await self._retried(check, "dedup.check_retry")
        out = known | found
        if out:
            dedup_hits.inc(len(out))
        return out

    def unreachable(self) -> None:
        """A check made elsewhere (the batch read) failed: the health report says so."""
        self.redis_ok = False

    def counted(self, done: set[str]) -> set[str]:
        """Record the answer of a done-flag check made elsewhere (the batch read:
        consume/batch_reads.py) as `already_done` would have: returns `done`."""
        self.redis_ok = True
        if done:
            dedup_hits.inc(len(done))
        return done

    def mark_done(
        self,
        message_id: str,
        on_durable: Callable[[], None],
        state: StateWrite | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        """Queue a done-flag write; `on_durable` runs (in the loop) once it is written.
        With `state`: the flag and the state change are written atomically, or neither
        (then `on_refused` runs instead: the version was stale or the message done)."""
        self._to_mark.append(_Mark(message_id, on_durable, state, on_refused))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def flushed(self) -> None:
        """Return once every done-flag queued so far is written (or bypassed by policy
        process). For a step that removes messages from the parking lot on the strength
        of their done-flags: flags are written in queue order, so an empty marker queued
        now fires after all of them."""
        if not self._to_mark and (self._flusher is None or self._flusher.done()):
            return
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not written.done():
                written.set_result(None)

        self.mark_done("", wake)
        await written

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the current tick add more marks to this batch
        while self._to_mark:
            batch, self._to_mark = self._to_mark, []
            ids = [m.message_id for m in batch if m.message_id and m.state is None]
            writes = [(m.message_id, m.state) for m in batch if m.state is not None]
            refused = await self._write(ids, writes) if ids or writes else set()
            for m in batch:
                if m.message_id in refused and m.state is not None:
                    if m.on_refused is not None:
                        m.on_refused()
                    continue
                if m.message_id:
                    self.recent.add(m.message_id)
                m.on_durable()

    async def _write(self, ids: list[str], writes: list[tuple[str, StateWrite]]) -> set[str]:
        """One store call for the batch, retried with backoff; policy process may skip
        plain flags, never a state commit (a state cannot be bypassed)."""
        op_id = uuid.uuid4().hex if writes else ""  # reused by every resend of this batch

        async def write() -> set[str]:
            if writes:
                return await self._reporting(self.store.commit(ids, writes, op_id))  # type: ignore[attr-defined]
            await self._reporting(self.store.mark_done(ids))
            return set()

        if self.policy == "process" and not writes:
            try:
                return await write()
            except DedupUnavailable as exc:
                dedup_bypassed.inc(len(ids))
                log.warning("dedup.mark_bypassed", count=len(ids), error=str(exc))
                return set()
        return await self._retried(write, "dedup.mark_retry")

    async def _reporting(self, call: Awaitable[T]) -> T:
        """`call`'s answer, keeping `redis_ok` (the host's health report) up to date."""
        try:
            answer = await call
        except DedupUnavailable:
            self.redis_ok = False
            raise
        self.redis_ok = True
        return answer

    async def _retried(self, call: Callable[[], Awaitable[T]], event: str) -> T:
        """Policy stop (or a state commit): retried with backoff until the store answers."""

        def on_retry(exc: BaseException, _attempt: int, delay_s: float) -> None:
            log.warning(event, delay_s=delay_s, error=str(exc))

        return await retry_async(
            call,
            retry_on=(DedupUnavailable,),
            wait=capped_exponential(0.05, self._retry_max_s),
            on_retry=on_retry,
            sleep=self._sleep,
        )

    @property
    def pending_marks(self) -> int:
        return len(self._to_mark)

"""The durable world the hosts run against: Kafka main topic and commits, Redis (done
flags, the parking lot, the rate limiter), the dead-letter topic and the DLQ recovery.

Everything here survives a host crash or a consumer restart; the fakes take seeded
faults from `faults.Faults` (Redis down: raise before applying; lost reply: apply, then
raise) and report what became durable to the `Ledger` (invariants.py). Every Redis call
takes a little virtual time, so a loop of calls always yields to the scheduler.
`ParkingModel` is the parking lot's Lua scripts (qywx_ray/dlq/parking.py) in Python,
call for call; test_parking_model.py checks it against the real scripts.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.sim import adapter
from tests.sim.faults import Faults
from tests.sim.invariants import Ledger
from tests.sim.trace import Trace

TOPIC = "main"
EPOCH_MS = 1_700_000_000_000
PARKED, ADMITTED, WAITED_ON = 0, 1, 2  # RetryOrder.admit codes (consume.types)


def mid_of(value: bytes) -> str:
    return str(json.loads(value)["message_id"])


def lrange(items: list[bytes], start: int, stop: int) -> list[bytes]:
    """Redis LRANGE index semantics (negative = from the end, stop inclusive)."""
    n = len(items)
    if start < 0:
        start = max(0, n + start)
    if stop < 0:
        stop = n + stop
    stop = min(stop, n - 1)
    return items[start : stop + 1] if start <= stop else []


def ltrim(items: list[bytes], start: int) -> list[bytes]:
    """LTRIM key start -1 (start >= 0)."""
    return items[start:]


# ---------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    user: str
    message_id: str
    value: bytes
    timestamp_ms: int
    retry_count: int = 0
    is_retry: bool = False
    origin: str = "ingest"  # ingest | retry | drain (a drain token: message_id = blocker)
    is_drain: bool = False


class Topic:
    """The main topic: N partitions of records, user -> partition by a stable hash."""

    def __init__(self, partitions: int) -> None:
        self.partitions: list[list[Record]] = [[] for _ in range(partitions)]
        self.committed: list[int] = [0] * partitions  # durable consumer-group commits

    def partition_of(self, user: str) -> int:
        return zlib.crc32(user.encode()) % len(self.partitions)

    def produce(
        self,
        user: str,
        message_id: str,
        value: bytes,
        now_s: float,
        retry_count: int = 0,
        is_retry: bool = False,
        origin: str = "ingest",
        is_drain: bool = False,
    ) -> Record:
        p = self.partition_of(user)
        log = self.partitions[p]
        r = Record(
            p,
            len(log),
            user,
            message_id,
            value,
            EPOCH_MS + int(now_s * 1000),
            retry_count,
            is_retry,
            origin,
            is_drain,
        )
        log.append(r)
        return r

    def end(self, partition: int) -> int:
        return len(self.partitions[partition])

    def all_committed(self) -> bool:
        return all(self.committed[p] == self.end(p) for p in range(len(self.partitions)))


# ---------------------------------------------------------------- Redis


class Redis:
    """Availability of the one Redis every fake uses, and its per-call latency."""

    def __init__(self, faults: Faults, clock: Callable[[], float]) -> None:
        self.faults = faults
        self.clock = clock
        self.down_until = -1.0

    def down(self) -> bool:
        return self.clock() < self.down_until

    async def call(self) -> None:
        """One round trip: the reply comes after a little virtual time."""
        await asyncio.sleep(self.faults.redis_latency())


class ParkingModel:
    """dlq/parking.py's _ADMIT, _PARK, _HOLD and _ADVANCE scripts, same arguments, same
    results."""

    def __init__(self) -> None:
        self.flags: dict[str, str] = {}
        self.lots: dict[str, list[bytes]] = {}
        self.at: dict[str, str] = {}  # "partition:offset" of a hold's blocker
        self.park_results: dict[str, int] = {}  # op id -> first answer (resends get it)
        self.ops: set[str] = set()

    def _lot(self, user: str) -> list[bytes]:
        return self.lots.get(user, [])

    def _set_lot(self, user: str, items: list[bytes]) -> None:
        if items:
            self.lots[user] = items
        else:
            self.lots.pop(user, None)  # Redis deletes an empty list

    def older_than_hold(self, user: str, partition: int, offset: int) -> bool:
        at = self.at.get(user)
        if at is None or offset < 0:
            return False
        p, o = at.split(":")
        return p == str(partition) and offset < int(o)

    def admit(self, items: Sequence[tuple[str, str, bytes, bool, int, int]]) -> list[int]:
        out: list[int] = []
        for user, mid, value, is_retry, partition, offset in items:
            waiting = self.flags.get(user)
            if waiting is not None and waiting == mid:
                out.append(WAITED_ON)
            elif (
                waiting is not None
                and not is_retry
                and not self.older_than_hold(user, partition, offset)
            ):
                self._set_lot(user, [*self._lot(user), value])
                out.append(PARKED)
            else:
                out.append(ADMITTED)
        return out

    def park(self, request: adapter.ParkRequest) -> int:
        r = request
        if r.op_id in self.park_results:
            return self.park_results[r.op_id]
        current = self.flags.get(r.user)
        if current is not None and current != r.message_id and current not in r.replaces:
            self.park_results[r.op_id] = 2
            return 2
        self.park_results[r.op_id] = 1
        self.flags[r.user] = r.message_id
        self.at.pop(r.user, None)
        lot = self._lot(r.user)
        if r.drop_first > 0:
            lot = ltrim(lot, r.drop_first)
        self._set_lot(r.user, [*r.pending, *lot])
        return 1

    def hold(self, request: adapter.HoldRequest) -> int:
        r = request
        if r.op_id in self.ops:
            return 0
        self.ops.add(r.op_id)
        if r.user not in self.flags:
            self.flags[r.user] = r.message_id
            self.at[r.user] = f"{r.position[0]}:{r.position[1]}"
        self._set_lot(r.user, [*self._lot(r.user), *r.values])
        return 1

    def advance(
        self, user: str, mid: str, drop_n: int, max_n: int, op_id: str
    ) -> tuple[int, list[bytes]]:
        if self.flags.get(user) != mid:
            return 0, []
        fresh = op_id not in self.ops
        self.ops.add(op_id)
        if fresh and drop_n > 0:
            self._set_lot(user, ltrim(self._lot(user), drop_n))
        items = lrange(self._lot(user), 0, max_n - 1)
        if not items:
            del self.flags[user]
            self.at.pop(user, None)
            return 2, []
        return 1, items

    # the recovery's synchronous calls (Parking.peek_parked / drop_parked / try_unpark)
    def peek(self, user: str, n: int) -> list[bytes]:
        return lrange(self._lot(user), 0, n - 1)

    def drop(self, user: str, n: int) -> None:
        if n > 0:
            self._set_lot(user, ltrim(self._lot(user), n))

    def try_unpark(self, user: str) -> bool:
        if not self._lot(user):
            self.flags.pop(user, None)
            self.at.pop(user, None)
            return True
        return False


class FakeRetryOrder:
    """consume.types.RetryOrder over the ParkingModel, with Redis faults."""

    def __init__(self, redis: Redis, model: ParkingModel, ledger: Ledger, trace: Trace) -> None:
        self.redis = redis
        self.model = model
        self.ledger = ledger
        self.trace = trace
        self.policy = "stop"
        self._op_names: dict[str, int] = {}  # op ids are random: trace a stable number
        self._chunk_ops: set[str] = set()

    def _op(self, op_id: str) -> int:
        return self._op_names.setdefault(op_id, len(self._op_names))

    def parks(self, reason: str) -> bool:
        return adapter.parks(reason)

    async def _fault_before(self, what: str) -> None:
        await self.redis.call()
        if self.redis.down():
            self.trace.add(f"redis down: {what} refused")
            raise adapter.InfraError(f"redis down ({what})")

    def _fault_after(self, what: str) -> None:
        if self.redis.faults.lose_reply():
            self.trace.add(f"redis: {what} applied, reply lost")
            raise adapter.InfraError(f"reply lost ({what})")

    async def admit(self, items: Sequence[tuple[str, str, bytes, bool, int, int]]) -> list[int]:
        try:
            # dlq/parking.py's two steps: the flags of the batch's users (MGET), then the
            # script for the items of the parked users only; other events may run between.
            await self._fault_before("admit flags")
            parked = {user for user, *_ in items if user in self.model.flags}
            self._fault_after("admit flags")
            codes = [ADMITTED] * len(items)
            if parked:
                at = [i for i, item in enumerate(items) if item[0] in parked]
                await self._fault_before("admit")
                for i, code in zip(at, self.model.admit([items[i] for i in at]), strict=True):
                    codes[i] = code
            self._admitted("admit", items, codes)
        except adapter.InfraError:
            self._admit_failed(items)
            raise
        return codes

    def _admitted(
        self, what: str, items: Sequence[tuple[str, str, bytes, bool, int, int]], codes: list[int]
    ) -> None:
        """Trace the codes the admit gave, then (maybe) lose its reply."""
        pairs = zip(items, codes, strict=True)
        self.trace.add(
            what + " " + " ".join(f"{m}{'(r)' if r else ''}={c}" for (_, m, _, r, _, _), c in pairs)
        )
        self._fault_after("admit")

    def _admit_failed(self, items: Sequence[tuple[str, str, bytes, bool, int, int]]) -> None:
        if self.policy == "process":  # the host admits them all unchecked
            self.ledger.exempt([m for _, m, *_ in items], "parking_bypassed")

    async def admit_flagged(
        self, items: Sequence[tuple[str, str, bytes, bool, int, int]]
    ) -> list[int]:
        """dlq/parking.py `admit_flagged`: the admit script for users whose flag the
        host's batch read found (no flag read of its own)."""
        try:
            await self._fault_before("admit")
            codes = self.model.admit(items)
            self._admitted("admit flagged", items, codes)
        except adapter.InfraError:
            self._admit_failed(items)
            raise
        return codes

    async def park(self, request: adapter.ParkRequest) -> int:
        r = request
        await self._fault_before("park")
        applied = self.model.park(r)
        self.trace.add(
            f"park {r.user} behind {r.message_id} drop={r.drop_first} "
            f"front=[{','.join(mid_of(v) for v in r.pending)}] op#{self._op(r.op_id)} "
            f"applied={applied}"
        )
        self._fault_after("park")
        return applied

    async def hold(self, request: adapter.HoldRequest) -> None:
        r = request
        await self._fault_before("hold")
        applied = self.model.hold(r)
        self.trace.add(
            f"hold {r.user} behind {r.message_id} [{','.join(mid_of(v) for v in r.values)}] "
            f"op#{self._op(r.op_id)} applied={applied}"
        )
        self._fault_after("hold")

    async def advance(
        self, user: str, message_id: str, drop_n: int, max_n: int, op_id: str = ""
    ) -> tuple[int, list[bytes]]:
        await self._fault_before("advance")
        status, items = self.model.advance(user, message_id, drop_n, max_n, op_id)
        if status == 1 and op_id not in self._chunk_ops:
            # a chunk with work in it (a resend of the same op, or a chunk of copies
            # already done, gives a drain nothing to hand its hold over at)
            self._chunk_ops.add(op_id)
            if any(mid_of(v) not in self.ledger.done for v in items):
                self.ledger.on_chunk(user)
        self.trace.add(
            f"advance {user} on {message_id} drop={drop_n} -> {status} "
            f"[{','.join(mid_of(v) for v in items)}]"
        )
        self._fault_after("advance")
        return status, items


class CommitModel:
    """COMMIT_LUA (consume/state.py) in Python, written apart from the real code (the
    grouping too), so the differential test tests/integration/test_sim_commit_model.py
    checks both against each other on a real Redis.

    One call: the plain done-flags, then the state writes in groups: a user's successive
    writes that chain (each expects the version the previous one left) are ONE group,
    applied whole or not at all: the stored version must be the group's first expected
    version and none of its messages done (nor twice in it); then all its flags and its
    last changed state. Once a group of a user is refused, the user's later groups in the
    call are refused too. A resend with the same op id gets the first answer."""

    def __init__(self) -> None:
        self.done: set[str] = set()
        self.states: dict[str, tuple[int, bytes]] = {}  # user -> (version, data)
        self.ops: dict[str, set[str]] = {}  # commit op id -> its answer

    def commit(
        self,
        message_ids: Sequence[str],
        writes: Sequence[tuple[str, adapter.StateWrite]],
        op_id: str,
    ) -> tuple[set[str], list[str], list[tuple[str, bytes]], bool]:
        """(refused message ids, newly flagged ids, states written, resent?)."""
        if op_id in self.ops:
            return self.ops[op_id], [], [], True
        flagged = [m for m in dict.fromkeys(message_ids) if m not in self.done]
        self.done.update(flagged)
        # [user, first expected, version after, last data, message ids]
        groups: list[list[Any]] = []
        last: dict[str, list[Any]] = {}
        for mid, w in writes:
            g = last.get(w.user)
            if g is None or g[2] != w.expected_version:
                g = [w.user, w.expected_version, w.expected_version, None, []]
                last[w.user] = g
                groups.append(g)
            g[4].append(mid)
            if w.data is not None:
                g[2] += 1
                g[3] = w.data
        refused: set[str] = set()
        broken: set[str] = set()
        written: list[tuple[str, bytes]] = []
        for user, expected, version, data, mids in groups:
            if (
                user in broken
                or self.states.get(user, (0, b""))[0] != expected
                or len(set(mids)) != len(mids)
                or any(m in self.done for m in mids)
            ):
                broken.add(user)
                refused.update(mids)
                continue
            if version != expected:
                self.states[user] = (version, data)
                written.append((user, data))
            self.done.update(mids)
            flagged += mids
        self.ops[op_id] = refused
        return refused, flagged, written, False


class FakeDoneStore:
    """consume.dedup.DoneStore with state commits, and consume.state.StateStore: the
    durable done-flags and per-user states. `commit` is COMMIT_LUA (consume/state.py) in
    Python, call for call (CommitModel); the model is checked against the real script on
    Redis in tests/integration/test_sim_commit_model.py."""

    def __init__(self, redis: Redis, ledger: Ledger, trace: Trace) -> None:
        self.redis = redis
        self.ledger = ledger
        self.trace = trace
        self.model = CommitModel()  # the durable done-flags, states and commit answers
        self.done = self.model.done
        self.policy = "stop"
        self.states = self.model.states

    async def done_among(self, message_ids: Sequence[str]) -> set[str]:
        await self.redis.call()
        if self.redis.down():
            if self.policy == "process":
                self.ledger.exempt(message_ids, "dedup_bypassed")
            raise adapter.DedupUnavailable("redis down (done_among)")
        return {m for m in message_ids if m in self.done}

    def _flag(self, m: str) -> None:
        if m not in self.done:
            self.done.add(m)
            self.ledger.on_done_durable(m)

    async def mark_done(self, message_ids: Sequence[str]) -> None:
        await self.redis.call()
        if self.redis.down():
            self.trace.add("redis down: mark_done refused")
            if self.policy == "process":
                self.ledger.exempt(message_ids, "mark_bypassed")
            raise adapter.DedupUnavailable("redis down (mark_done)")
        for m in message_ids:
            self._flag(m)
        self.trace.add(f"done-flags {','.join(message_ids)}")
        if self.redis.faults.lose_reply():
            self.trace.add("redis: mark_done applied, reply lost")
            raise adapter.DedupUnavailable("reply lost (mark_done)")

    async def commit(
        self,
        message_ids: Sequence[str],
        writes: Sequence[tuple[str, adapter.StateWrite]],
        op_id: str,
    ) -> set[str]:
        await self.redis.call()
        if self.redis.down():
            self.trace.add("redis down: commit refused")
            raise adapter.DedupUnavailable("redis down (commit)")
        refused, flagged, written, resent = self.model.commit(message_ids, writes, op_id)
        if resent:
            self.trace.add(f"commit resent: first answer refused={sorted(refused)}")
            return refused
        for m in flagged:
            self.ledger.on_done_durable(m)
        for user, data in written:
            self.ledger.on_state_durable(user, data)
        self.trace.add(
            f"commit flags={','.join(message_ids)} "
            f"states={','.join(f'{m}@{w.user}v{w.expected_version}' for m, w in writes)} "
            f"refused={','.join(sorted(refused))}"
        )
        if self.redis.faults.lose_reply():
            self.trace.add("redis: commit applied, reply lost")
            raise adapter.DedupUnavailable("reply lost (commit)")
        return refused

    async def load(self, users: Sequence[str]) -> dict[str, adapter.StateSlot]:
        await self.redis.call()
        if self.redis.down():
            raise adapter.StateUnavailable("redis down (state load)")
        out = {}
        for u in users:
            v, data = self.states.get(u, (0, b""))
            out[u] = adapter.StateSlot(v, data)
        self.trace.add(f"state load {','.join(f'{u}v{out[u].version}' for u in users)}")
        return out


class FakeAdmission:
    """The rate limiter (TimedAdmission): sometimes denies rate_limited; Redis-backed."""

    def __init__(
        self, redis: Redis, ledger: Ledger, trace: Trace, by_send_time: dict[tuple[str, int], str]
    ) -> None:
        self.redis = redis
        self.ledger = ledger
        self.trace = trace
        self.by_send_time = by_send_time  # (user, send_time) -> message id (unique)

    async def admit(self, requests: Sequence[tuple[str, int]]) -> dict[str, list[str | None]]:
        raise AssertionError("the host must use admit_at")

    async def admit_at(
        self, requests: Sequence[tuple[str, Sequence[float]]]
    ) -> dict[str, list[str | None]]:
        await self.redis.call()
        if self.redis.down():
            raise adapter.InfraError("redis down (rate limiter)")
        out: dict[str, list[str | None]] = {}
        for user, times in requests:
            got: list[str | None] = []
            for t in times:
                if self.redis.faults.deny():
                    mid = self.by_send_time[(user, int(t))]
                    self.trace.add(f"rate limiter denies {mid}")
                    if not adapter.parks(adapter.REASON_RATE_LIMITED):
                        self.ledger.exempt([mid], "rate_limited")
                    got.append(adapter.REASON_RATE_LIMITED)
                else:
                    got.append(None)
            out[user] = got
        return out

    def on_success(self, user: str) -> None:
        return None

    def on_failure(self, user: str) -> None:
        return None


class FakeBatchReads:
    """consume/batch_reads.py's one call per delivery batch, over the same durable state
    as the separate fakes: the done-flags (FakeDoneStore), the parking flags (the
    ParkingModel) and FakeAdmission's denials, with the same Redis faults. As BATCH_LUA:
    a rated message whose done-flag exists is not rated. A failure (down, or the reply
    lost after the denials were drawn) raises; the host then applies its policy."""

    rates = True

    def __init__(
        self,
        redis: Redis,
        done: FakeDoneStore,
        parking: ParkingModel,
        ledger: Ledger,
        trace: Trace,
    ) -> None:
        self.redis = redis
        self.done = done
        self.parking = parking
        self.ledger = ledger
        self.trace = trace

    async def read(self, plan: adapter.BatchReadPlan) -> adapter.BatchAnswer:
        await self.redis.call()
        if self.redis.down():
            self.trace.add("redis down: batch read refused")
            raise adapter.InfraError("redis down (batch read)")
        done = set(plan.known) | {m for m in plan.ask if m in self.done.done}
        flagged = {u for u in plan.users if u in self.parking.flags}
        reasons: dict[str, str] = {}
        for item in plan.rate:
            if item.message_id in done:
                continue
            if self.redis.faults.deny():
                self.trace.add(f"rate limiter denies {item.message_id}")
                if not adapter.parks(adapter.REASON_RATE_LIMITED):
                    self.ledger.exempt([item.message_id], "rate_limited")
                reasons[item.message_id] = adapter.REASON_RATE_LIMITED
        self.trace.add(
            f"batch read done={','.join(sorted(done - plan.known))} "
            f"flagged={','.join(sorted(flagged))} rated={len(plan.rate)}"
        )
        if self.redis.faults.lose_reply():
            self.trace.add("redis: batch read applied, reply lost")
            raise adapter.InfraError("reply lost (batch read)")
        return adapter.BatchAnswer(done, flagged, reasons)


# ---------------------------------------------------------------- dead letters


@dataclass
class Letter:
    letter: adapter.DeadLetter
    durable_s: float


class FakeDeadLetterSink:
    """The DLQ topic: resolves only once the letters are durable; sometimes fails."""

    def __init__(self, faults: Faults, ledger: Ledger, trace: Trace, clock: Callable[[], float]):
        self.faults = faults
        self.ledger = ledger
        self.trace = trace
        self.clock = clock
        self.log: list[Letter] = []

    async def dead_letter(self, letters: Sequence[adapter.DeadLetter]) -> None:
        await asyncio.sleep(self.faults.dlq_latency())
        if self.faults.dlq_fails():
            self.trace.add(f"dlq write fails ({len(letters)} letters)")
            raise RuntimeError("DLQ unavailable")
        for lt in letters:
            self.log.append(Letter(lt, self.clock()))
            self.ledger.on_letter(lt, EPOCH_MS + int(self.clock() * 1000))
            self.trace.add(f"letter {lt.message_id} {lt.reason} attempt={lt.attempt}")


@dataclass
class Scheduled:
    due_s: float
    user: str
    message_id: str
    value: bytes
    retry_count: int


@dataclass
class Recovery:
    """The DLQ recovery service: reads letters, `decide`s (real strategies), re-produces
    due retries to the main topic with the retry headers; a letter sent to manual review
    releases the users parked behind it (re-produced as retries, in order, then unpark)."""

    topic: Topic
    sink: FakeDeadLetterSink
    redis: Redis
    parking: ParkingModel
    ledger: Ledger
    trace: Trace
    faults: Faults
    clock: Callable[[], float]
    read: int = 0
    scheduled: list[Scheduled] = field(default_factory=list)
    entries: set[str] = field(default_factory=set)
    releasing: list[tuple[str, str]] = field(default_factory=list)

    def idle(self) -> bool:
        return self.read == len(self.sink.log) and not self.scheduled and not self.releasing

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.faults.recovery_tick())
            if self.redis.down():  # delay queue and parking lot live in Redis
                continue
            await self.consume()
            await self.release()
            self.fire_due()

    async def consume(self) -> None:
        while self.read < len(self.sink.log):
            lt = self.sink.log[self.read].letter
            self.read += 1
            now = self.clock()
            cfg = self.faults.cfg
            decision, retry_count = adapter.decide(lt, now, cfg.max_retries, cfg.backoff_base_s)
            if decision is None:
                self.ledger.on_review(lt.message_id)
                self.trace.add(f"recovery: {lt.message_id} -> manual review")
                self.releasing.append((lt.user, lt.message_id))
                continue
            entry = f"{lt.message_id}:{retry_count}"
            if entry in self.entries:  # DelayQueue: one entry per id while it is queued
                continue
            self.entries.add(entry)
            due = decision + self.faults.recovery_jitter()
            self.scheduled.append(Scheduled(due, lt.user, lt.message_id, lt.value, retry_count))
            self.trace.add(f"recovery: {lt.message_id} retry #{retry_count + 1} at {due:.3f}")

    def fire_due(self) -> None:
        now = self.clock()
        due = [s for s in self.scheduled if s.due_s <= now]
        self.scheduled = [s for s in self.scheduled if s.due_s > now]
        for s in sorted(due, key=lambda s: s.due_s):
            self.entries.discard(f"{s.message_id}:{s.retry_count}")  # acked: id free again
            r = self.topic.produce(
                s.user, s.message_id, s.value, now, s.retry_count + 1, True, "retry"
            )
            self.trace.add(f"retry record {s.message_id} p{r.partition}@{r.offset}")

    async def release(self) -> None:
        """recovery._release_parked: a blocker in manual review releases its user with a
        drain token on the main topic (when the user still waits on it); the host drains."""
        while self.releasing:
            user, mid = self.releasing[0]
            await self.redis.call()
            if self.redis.down():
                return
            if self.parking.flags.get(user) == mid:
                r = self.topic.produce(
                    user, mid, token_value(user, mid), self.clock(), 0, True, "drain", True
                )
                self.trace.add(
                    f"recovery: drain token for {user} behind {mid} p{r.partition}@{r.offset}"
                )
            self.releasing.pop(0)


def token_value(user: str, mid: str) -> bytes:
    from qywx_ray.dlq.tokens import drain_token_record

    return drain_token_record(user, mid, "kf")[1]


class FakeDrainTokens:
    """consume.types.DrainTokenSink: a confirmed produce to the main topic; sometimes fails
    (the host retries it)."""

    def __init__(self, topic: Topic, faults: Faults, trace: Trace, clock: Callable[[], float]):
        self.topic = topic
        self.faults = faults
        self.trace = trace
        self.clock = clock

    async def drain_token(self, user: str, message_id: str, open_kfid: str) -> None:
        await asyncio.sleep(self.faults.dlq_latency())
        if self.faults.dlq_fails():
            self.trace.add(f"drain token for {user} fails")
            raise RuntimeError("main topic unavailable")
        r = self.topic.produce(
            user, message_id, token_value(user, message_id), self.clock(), 0, True, "drain", True
        )
        self.trace.add(f"drain token {user} behind {message_id} p{r.partition}@{r.offset}")

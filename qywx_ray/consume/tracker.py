"""The bookkeeping of one partition consumer, as a pure state machine: events in, commands out.

A partition consumer must never commit past an unfinished offset, never send message N+1
of a user to a new actor instance while N may still be with the old one, and never act
for a partition it no longer owns. Those rules used to be spread over a threaded actor
that also talked to Kafka and Ray, where a record polled just before a revoke could still
be dispatched and its completion committed for a partition owned by someone else (issue
15, item 3). Here they live in one object without Kafka, Ray, threads or a clock (callers
pass `now`), so every interleaving can be unit-tested.

What it keeps:
- ownership: assigned partitions, those being revoked, and an assignment serial, so a
  record fetched under an earlier assignment of a partition is told apart from one
  fetched under the current one;
- one watermark per owned partition (watermark.py), created by the first accepted record
  and dropped with the partition: nothing else ever creates one;
- per target (host or dedicated user actor): the deliveries in flight in original order,
  READY/RECOVERING with an epoch (answers to calls of an older epoch are ignored) and the
  incarnation it was last seen with;
- in dedicated mode, per user: which target holds it and how much, so idle users can be
  handed back to the shared placement (placement.py).

Events: `assigned`, `revoking`, `revoked`, `lost`, `polled`, `completed`, `due` (periodic:
which targets to recover, probe or forget), `recovered`, `recovery_failed`,
`target_failed`, `incarnation_seen`, `commit_due`/`commit_now`, `commit_failed`.
Commands: `Send` (deliver these, in this order, to this incarnation), `Call` (ask this
target for its incarnation), `Forgotten` (this user's placement may be released), and
offsets to commit. The caller executes them and reports the outcome as events.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from qywx_ray.consume.types import Delivery
from qywx_ray.consume.watermark import CommitPolicy, WatermarkTable

TP = tuple[str, int]
TPO = tuple[str, int, int]

READY = "ready"
RECOVERING = "recovering"
# Target keys of dedicated user actors start with this (hosts.user_actor_name).
DEDICATED_PREFIX = "user:"

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


class Send(NamedTuple):
    """Deliver `deliveries` (in this order) to `key`, addressed to `incarnation`; report
    the answer with `epoch`. `resend`: they were sent before, to an earlier instance."""

    key: str
    epoch: int
    incarnation: str | None
    deliveries: list[Delivery]
    resend: bool = False


class Call(NamedTuple):
    """Ask target `key` for its incarnation (a recovery or a health probe)."""

    key: str
    epoch: int
    dedicated: bool


class Forgotten(NamedTuple):
    """`user` has been idle, with nothing in flight, on `key` (its partition: `tp`)."""

    user: str
    key: str
    tp: TP


class Polled(NamedTuple):
    sends: list[Send]  # for READY targets; RECOVERING ones get theirs on `recovered`
    accepted: int
    dropped: int  # partition not owned, being revoked, or re-assigned since the fetch
    replays: int  # offsets not above what the partition's watermark already saw
    per_partition: dict[int, int]  # accepted records by partition


class Due(NamedTuple):
    recover: list[Call]
    probe: list[Call]
    forgotten_users: list[Forgotten]
    forgotten_targets: list[str]
    health_tick: bool  # the health interval elapsed (probes and forgetting ran)


@dataclass
class TargetState:
    """What the consumer knows of one host or dedicated user actor."""

    key: str
    dedicated: bool
    state: str = RECOVERING
    epoch: int = 0
    incarnation: str | None = None
    inflight: OrderedDict[TPO, Delivery] = field(default_factory=OrderedDict)
    last_used_s: float = 0.0
    next_try_s: float = 0.0
    backoff_s: float = BACKOFF_MIN_S
    calling_since_s: float | None = None  # a recovery call is out since then
    probing: bool = False  # a health probe is out


@dataclass
class _UserSlot:
    key: str
    tp: TP
    inflight: int = 0
    last_used_s: float = 0.0


class ConsumerTracker:
    """Ownership, watermarks, in-flight deliveries, target states and commit decisions.

    `forget_after_s`: dedicated mode. Dedicated targets (and, per user, placements) idle
    that long with nothing in flight are forgotten; None (hosted mode) forgets nothing.
    `recovery_timeout_s`: a recovery call unanswered that long is abandoned (its late
    answer becomes stale) and tried again.
    """

    def __init__(
        self,
        *,
        commit_every_messages: int = 1000,
        commit_interval_s: float = 1.0,
        health_interval_s: float = 1.0,
        forget_after_s: float | None = None,
        recovery_timeout_s: float = 60.0,
    ) -> None:
        self._table = WatermarkTable()
        self._policy = CommitPolicy(commit_every_messages, commit_interval_s)
        self._commit_interval_s = commit_interval_s
        self._health_interval_s = health_interval_s
        self._forget_after_s = forget_after_s
        self._recovery_timeout_s = recovery_timeout_s
        self._assigned: dict[TP, int] = {}  # partition -> serial of its assignment
        self._revoking: set[TP] = set()
        self._serial = 0
        self.targets: dict[str, TargetState] = {}
        self._where: dict[TPO, str] = {}  # in-flight offset -> target key
        self._users: dict[str, _UserSlot] | None = {} if forget_after_s is not None else None
        self._last_commit_s: float | None = None
        self._last_health_s: float | None = None
        self.recoveries = 0
        self.resent = 0
        self.completed_total = 0

    # ------------------------------------------------------------ ownership

    @property
    def serial(self) -> int:
        """Changes with every rebalance event. Read it right after a fetch returns and
        pass it to `polled`: records of a partition assigned after that are dropped."""
        return self._serial

    def assigned(self, tps: Iterable[TP]) -> None:
        """New partitions start fresh: no watermark until their first record, which
        comes from the group's committed offset."""
        self._serial += 1
        tps = set(tps)
        again = {tp for tp in tps if tp in self._assigned}
        if again:  # assigned without a revoke in between: forget the old assignment
            self._release(again)
            self._serial += 1
        for tp in tps:
            self._table.drop(*tp)
            self._assigned[tp] = self._serial

    def revoking(self, tps: Iterable[TP]) -> None:
        """Revoke started: accept no new record of these; completions still count (the
        caller waits for them, commits, then reports `revoked`)."""
        self._serial += 1
        self._revoking |= {tp for tp in tps if tp in self._assigned}

    def revoked(self, tps: Iterable[TP]) -> int:
        """The partitions are gone: forget their watermarks and in-flight deliveries
        (the next owner re-reads from the commit). Returns how many were dropped."""
        return self._release(set(tps))

    def lost(self, tps: Iterable[TP]) -> int:
        """Lost without a revoke (session timeout): the same, and nothing is committed."""
        return self._release(set(tps))

    def owns(self, tp: TP) -> bool:
        return tp in self._assigned

    def accepts(self, tp: TP, fetched_at: int | None = None) -> bool:
        """Would a record of `tp` fetched at serial `fetched_at` be dispatched now?"""
        at = self._assigned.get(tp)
        if at is None or tp in self._revoking:
            return False
        return fetched_at is None or at <= fetched_at

    def _release(self, tps: set[TP]) -> int:
        self._serial += 1
        gone = [tpo for tpo in self._where if (tpo[0], tpo[1]) in tps]
        for tpo in gone:
            self._untrack(tpo)
        for tp in tps:
            self._table.drop(*tp)
            self._assigned.pop(tp, None)
        self._revoking -= tps
        if self._users:
            # The partition's next owner is now responsible for these users' placements.
            for user in [u for u, slot in self._users.items() if slot.tp in tps]:
                del self._users[user]
        return len(gone)

    # ------------------------------------------------------------ records

    def polled(
        self,
        records: Sequence[Delivery],
        route: Callable[[str], str],
        now: float,
        fetched_at: int | Sequence[int] | None = None,
    ) -> Polled:
        """Track the records this consumer may dispatch and group them by target.

        `route(user)` names the target of a user (called only for accepted records).
        `fetched_at`: `serial` read when the records were fetched, one for all or one
        per record. Records of partitions not owned, being revoked, or assigned again
        since the fetch are dropped and never tracked: no watermark, no commit.
        """
        groups: dict[str, list[Delivery]] = {}
        per_partition: dict[int, int] = {}
        dropped = replays = accepted = 0
        for i, d in enumerate(records):
            tp = (d.topic, d.partition)
            at = fetched_at if fetched_at is None or isinstance(fetched_at, int) else fetched_at[i]
            if not self.accepts(tp, at):
                dropped += 1
                continue
            key = route(d.key)  # first: a failing route leaves nothing half-tracked
            if not self._table.get(*tp).add(d.offset):
                replays += 1
                continue
            t = self.targets.get(key)
            if t is None:
                t = self.targets[key] = TargetState(key, key.startswith(DEDICATED_PREFIX))
            t.inflight[d.tpo] = d
            t.last_used_s = now
            self._where[d.tpo] = key
            if self._users is not None:
                slot = self._users.get(d.key)
                if slot is None:
                    slot = self._users[d.key] = _UserSlot(key, tp)
                slot.key, slot.tp = key, tp
                slot.inflight += 1
                slot.last_used_s = now
            batch = groups.get(key)
            if batch is None:
                batch = groups[key] = []
            batch.append(d)
            per_partition[d.partition] = per_partition.get(d.partition, 0) + 1
            accepted += 1
        sends = []
        for key, batch in groups.items():
            t = self.targets[key]
            if t.state == READY:
                sends.append(Send(key, t.epoch, t.incarnation, batch))
        return Polled(sends, accepted, dropped, replays, per_partition)

    def completed(self, tpos: Iterable[TPO]) -> int:
        """Mark finished offsets; returns how many were in flight here. Offsets of
        partitions not owned (any more) are ignored: never creates a watermark."""
        n = 0
        for tpo in tpos:
            if (tpo[0], tpo[1]) not in self._assigned:
                continue
            self._untrack(tpo)
            if self._table.done(*tpo):
                n += 1
        self._policy.record_done(n)
        self.completed_total += n
        return n

    def _untrack(self, tpo: TPO) -> None:
        key = self._where.pop(tpo, None)
        if key is None:
            return
        t = self.targets.get(key)
        d = t.inflight.pop(tpo, None) if t is not None else None
        if d is not None and self._users is not None:
            slot = self._users.get(d.key)
            if slot is not None and slot.inflight > 0:
                slot.inflight -= 1

    # ------------------------------------------------------------ targets

    def due(self, now: float) -> Due:
        """Periodic work: recoveries to (re)try now, and every health interval the READY
        targets holding work to probe and the idle ones to forget."""
        recover = []
        for t in self.targets.values():
            if t.state != RECOVERING:
                continue
            if t.calling_since_s is not None:
                if now - t.calling_since_s <= self._recovery_timeout_s:
                    continue
                t.calling_since_s = None  # abandoned: its answer, if any, is stale
                t.epoch += 1
            # An empty dedicated target is not recovered: that would re-create an actor
            # that ended itself for being idle.
            if (t.inflight or not t.dedicated) and now >= t.next_try_s:
                t.calling_since_s = now
                recover.append(Call(t.key, t.epoch, t.dedicated))
        probe: list[Call] = []
        users: list[Forgotten] = []
        targets: list[str] = []
        tick = self._last_health_s is None or now - self._last_health_s >= self._health_interval_s
        if tick:
            self._last_health_s = now
            for t in self.targets.values():
                if t.state == READY and t.inflight and not t.probing:
                    t.probing = True
                    probe.append(Call(t.key, t.epoch, t.dedicated))
            users, targets = self._forget_idle(now)
        return Due(recover, probe, users, targets, tick)

    def _forget_idle(self, now: float) -> tuple[list[Forgotten], list[str]]:
        horizon = self._forget_after_s
        if horizon is None:
            return [], []
        users = []
        if self._users:
            for user, slot in list(self._users.items()):
                if slot.inflight == 0 and now - slot.last_used_s > horizon:
                    del self._users[user]
                    users.append(Forgotten(user, slot.key, slot.tp))
        targets = []
        for key, t in list(self.targets.items()):
            if t.dedicated and not t.inflight and now - t.last_used_s > horizon:
                del self.targets[key]
                targets.append(key)
        return users, targets

    def knows_user(self, user: str) -> bool:
        return self._users is not None and user in self._users

    def is_current(self, key: str, epoch: int) -> bool:
        """Whether an answer to a call made with (key, epoch) would still be heard."""
        t = self.targets.get(key)
        return t is not None and t.epoch == epoch

    def recovery_failed(self, key: str, epoch: int, now: float) -> None:
        """The recovery call could not be made or failed: retry later, backing off."""
        t = self.targets.get(key)
        if t is None or t.epoch != epoch or t.state != RECOVERING:
            return
        t.calling_since_s = None
        t.next_try_s = now + t.backoff_s
        t.backoff_s = min(t.backoff_s * 2, BACKOFF_MAX_S)

    def recovered(self, key: str, epoch: int, incarnation: str, now: float) -> Send | None:
        """The target answered with its incarnation: READY, and everything it may have
        lost goes first, in original order, before any new message."""
        t = self.targets.get(key)
        if t is None or t.epoch != epoch or t.state != RECOVERING:
            return None
        first = t.incarnation is None
        t.calling_since_s = None
        t.incarnation = incarnation
        t.state = READY
        t.epoch += 1
        t.backoff_s = BACKOFF_MIN_S
        t.next_try_s = now
        if not t.inflight:
            return None
        batch = list(t.inflight.values())
        if not first:
            self.resent += len(batch)
        return Send(key, t.epoch, incarnation, batch, resend=not first)

    def target_failed(self, key: str, epoch: int, *, probe: bool = False) -> bool:
        """A delivery or probe of `epoch` failed: recover. True if a recovery started."""
        t = self._answered(key, epoch, probe)
        return t is not None and self._start_recovery(t)

    def incarnation_seen(
        self, key: str, epoch: int, incarnation: str, *, probe: bool = False
    ) -> bool:
        """A delivery or probe of `epoch` answered with `incarnation`; another instance
        than the one we sent to means ours may have lost messages: recover (True)."""
        t = self._answered(key, epoch, probe)
        if t is None or incarnation == t.incarnation:
            return False
        return self._start_recovery(t)

    def _answered(self, key: str, epoch: int, probe: bool) -> TargetState | None:
        t = self.targets.get(key)
        if t is None or t.epoch != epoch:
            return None  # a call to an instance we already gave up on
        if probe:
            t.probing = False
        return t

    def _start_recovery(self, t: TargetState) -> bool:
        if t.state == RECOVERING:
            return False
        self.recoveries += 1
        t.state = RECOVERING
        t.epoch += 1
        t.calling_since_s = None
        t.probing = False
        return True

    # ------------------------------------------------------------ commits

    def commit_due(self, now: float) -> dict[TP, int]:
        """Offsets to commit now: when enough finished or the interval passed (the
        interval also re-offers offsets whose commit failed)."""
        if self._last_commit_s is None:
            self._last_commit_s = now
        if not (self._policy.due(now) or now - self._last_commit_s >= self._commit_interval_s):
            return {}
        return self.commit_now(now)

    def commit_now(self, now: float, only: Iterable[TP] | None = None) -> dict[TP, int]:
        """Offsets that advanced since the last commit, owned partitions only, each the
        smallest unfinished offset (or one past the highest seen). Marked as committed:
        report `commit_failed` if the commit did not happen."""
        self._last_commit_s = now
        keep = set(only) if only is not None else None
        offsets = {
            tp: o
            for tp, o in self._table.pending_commits().items()
            if tp in self._assigned and (keep is None or tp in keep)
        }
        self._table.mark_committed(offsets)
        self._policy.committed(now)
        return offsets

    def commit_failed(self, tps: Iterable[TP]) -> None:
        """Offer these partitions' offsets again at the next commit."""
        for tp in tps:
            mark = self._table._marks.get(tp)
            if mark is not None:
                mark.committed = None

    # ------------------------------------------------------------ views

    @property
    def inflight(self) -> int:
        return len(self._where)

    def inflight_in(self, tps: Iterable[TP]) -> int:
        return sum(self._table.inflight(t, p) for t, p in tps)

    def assigned_partitions(self) -> list[TP]:
        return sorted(self._assigned)

    def committed(self) -> dict[TP, int | None]:
        return {tp: m.committed for tp, m in self._table._marks.items()}

    def committable(self, tp: TP) -> int | None:
        mark = self._table._marks.get(tp)
        return mark.committable() if mark is not None else None

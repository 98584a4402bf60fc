"""The ledger of what happened, and the invariants checked against it.

Checked as things happen (the step hook raises at the first step with a violation):
  order             per user, a message's first handler success comes after every
                    earlier message (Kafka order; retries count at the original's position)
                    succeeded or was resolved otherwise (permanent failure, manual review)
  rerun_after_done  no handler starts for a message whose done-flag is durable
  state_seen        a handler starts with a state (`ctx.state["seen"]`: the ids applied)
                    that holds each id once, only ids whose handler succeeded (a failed
                    attempt's mutation never leaks), and not its own id
  commit_unfinished a commit never passes a record that is not durably finished: done-flag,
                    a dead letter of it written since, parked in the lot, or another
                    record of the message still to come
  commit_pinned     a partition's commit is not held by one user's drain (the retry record
                    or drain token the user is parked behind, in flight) longer than
                    `pin_bound_s`, nor across more than two chunks of the drain (each
                    chunk hands the hold to a new token; `PIN_CHUNK_GRACE_S` lets the
                    batched completion reach the consumer)
Checked at the end (faults stopped, clock run long enough):
  stuck             every partition committed to its end
  vanished          every message done (flag durable) or in manual review with a letter
  parked_at_end     no user parked, no parked list left
  state             each user's durable state is the fold of that user's successfully
                    handled messages, each applied once: exactly the messages whose
                    done-flag is durable, no id twice, and in Kafka order (except the
                    order-exempt, and a message given up on first: a permanent failure
                    whose re-pulled copy later succeeded applies when it does)

Exemptions are explicit, by kind: `rate_limited` (denied by the limiter, which does not
park: order), `parking_bypassed` (admitted unchecked while Redis was down, policy process:
order), `dedup_bypassed` (no dedup check, policy process: rerun_after_done),
`mark_bypassed` (done-flag write skipped, policy process: done-flag durability).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.sim import adapter
from tests.sim.trace import Trace

if TYPE_CHECKING:
    from tests.sim.world import ParkingModel, Topic

ORDER_EXEMPT = ("rate_limited", "parking_bypassed")
PIN_CHUNK_GRACE_S = 0.25  # virtual seconds a hand-over may take to reach the consumer


class Violation(AssertionError):
    """An invariant failed; the message names it first (`order: ...`)."""


@dataclass
class Msg:
    message_id: str
    user: str
    seq: int  # position among the user's messages (production order)


@dataclass
class Ledger:
    clock: Callable[[], float]
    trace: Trace
    pin_bound_s: float
    msgs: dict[str, Msg] = field(default_factory=dict)
    by_user: dict[str, list[str]] = field(default_factory=dict)
    succeeded: dict[str, float] = field(default_factory=dict)  # first success
    done: set[str] = field(default_factory=set)  # done-flag durable
    letters: dict[str, list[adapter.DeadLetter]] = field(default_factory=dict)
    letter_ms: dict[str, list[int]] = field(default_factory=dict)  # when each was durable
    review: set[str] = field(default_factory=set)
    exempted: dict[str, set[str]] = field(default_factory=dict)  # kind -> message ids
    violations: list[str] = field(default_factory=list)
    reported: int = 0
    max_pinned_s: float = 0.0
    max_head_s: float = 0.0
    _head: dict[int, tuple[int, float, bool]] = field(default_factory=dict)
    chunks: dict[str, int] = field(default_factory=dict)  # drain chunks read, per user
    _head_chunks: dict[int, int] = field(default_factory=dict)
    _reader: dict[int, str] = field(default_factory=dict)  # consumer generation
    max_pinned_chunks: int = 0

    def on_chunk(self, user: str) -> None:
        """A drain read its next chunk of the user's lot (advance answered 1)."""
        self.chunks[user] = self.chunks.get(user, 0) + 1

    handler_runs: int = 0
    states: dict[str, bytes] = field(default_factory=dict)  # user -> durable state

    # ------------------------------------------------------------ recording

    def add_message(self, mid: str, user: str) -> None:
        seq = len(self.by_user.setdefault(user, []))
        self.by_user[user].append(mid)
        self.msgs[mid] = Msg(mid, user, seq)

    def exempt(self, mids: Iterable[str], kind: str) -> None:
        got = self.exempted.setdefault(kind, set())
        for m in mids:
            if m not in got:
                got.add(m)
                self.trace.add(f"exempt {m}: {kind}")

    def is_exempt(self, mid: str, kinds: Iterable[str]) -> bool:
        return any(mid in self.exempted.get(k, ()) for k in kinds)

    def fail(self, text: str) -> None:
        self.trace.add(f"VIOLATION {text}")
        self.violations.append(text)

    def on_done_durable(self, mid: str) -> None:
        self.done.add(mid)

    def on_state_durable(self, user: str, data: bytes) -> None:
        self.states[user] = data

    def on_letter(self, letter: adapter.DeadLetter, durable_ms: int) -> None:
        self.letters.setdefault(letter.message_id, []).append(letter)
        self.letter_ms.setdefault(letter.message_id, []).append(durable_ms)

    def on_review(self, mid: str) -> None:
        self.review.add(mid)

    def resolved(self, mid: str) -> bool:
        """Succeeded, or will never be: later messages may go on without it."""
        if mid in self.succeeded or mid in self.review:
            return True
        return any(not adapter.parks(lt.reason) for lt in self.letters.get(mid, ()))

    # ------------------------------------------------------------ checked as it happens

    def on_handler_start(self, mid: str, attempt: int) -> None:
        self.handler_runs += 1
        self.trace.add(f"handler start {mid} attempt={attempt}")
        if mid in self.done and not self.is_exempt(mid, ("dedup_bypassed",)):
            self.fail(f"rerun_after_done: handler started for {mid}, its done-flag is durable")

    def on_handler_state(self, mid: str, user: str, seen: list[str]) -> None:
        if len(set(seen)) != len(seen):
            self.fail(f"state_seen: {mid} of {user} starts with an id applied twice: {seen}")
        leaked = [m for m in seen if m not in self.succeeded]
        if leaked:
            self.fail(f"state_seen: {mid} of {user} sees {leaked}, never succeeded (leaked)")
        if mid in seen:  # (a stateful handler's done-flag check is never bypassed)
            self.fail(f"state_seen: {mid} of {user} starts with itself already applied")

    def on_handler_success(self, mid: str) -> None:
        self.trace.add(f"handler ok {mid}")
        if mid in self.succeeded:
            return
        self.succeeded[mid] = self.clock()
        if self.is_exempt(mid, ORDER_EXEMPT):
            return
        m = self.msgs[mid]
        for earlier in self.by_user[m.user][: m.seq]:
            if self.is_exempt(earlier, ORDER_EXEMPT) or self.resolved(earlier):
                continue
            self.fail(f"order: {mid} succeeded before the earlier {earlier} of user {m.user}")
            return

    def finished(self, topic: Topic, parking: ParkingModel, partition: int, offset: int) -> bool:
        r = topic.partitions[partition][offset]
        mid = r.message_id
        if r.is_drain:  # a drain token holds its user's drain: free once a newer one
            # is on the topic, or the user no longer waits on `mid` (drained, or parked
            # behind a new blocker whose outcome is durable)
            if any(
                x.is_drain and x.message_id == mid and x.offset > offset
                for x in topic.partitions[partition]
            ):
                return True
            waiting = parking.flags.get(r.user)
            if waiting is None:
                return True
            if waiting == mid:
                return False
            return (
                waiting in self.done
                or bool(self.letters.get(waiting))
                or any(
                    x.message_id == waiting and x.offset > offset
                    for x in topic.partitions[partition]
                )
            )
        if mid in self.done or self.is_exempt(mid, ("mark_bypassed",)):
            return True
        # a letter durable since the record was written (one letter covers every delivery
        # of the message the host held at the time, and drained copies have no offset)
        if any(ms >= r.timestamp_ms for ms in self.letter_ms.get(mid, ())):
            return True
        from tests.sim.world import mid_of

        if any(mid_of(v) == mid for v in parking.lots.get(r.user, ())):
            return True
        return any(x.message_id == mid and x.offset > offset for x in topic.partitions[partition])

    def check_commit(
        self, topic: Topic, parking: ParkingModel, partition: int, old: int, new: int
    ) -> None:
        for o in range(old, new):
            if not self.finished(topic, parking, partition, o):
                r = topic.partitions[partition][o]
                how = (
                    "its handler succeeded, done-flag not durable yet"
                    if r.message_id in self.succeeded
                    else "never succeeded: a crash now loses it"
                )
                self.fail(
                    f"commit_unfinished: p{partition} committed {new} past offset {o} "
                    f"({r.message_id}, {r.origin}) that is not durably finished ({how})"
                )
                return

    def observe_head(
        self, partition: int, head: int | None, draining: bool, user: str = "", reader: str = ""
    ) -> None:
        """The smallest in-flight offset of a partition (None: nothing in flight) and
        whether it is the retry record its user is parked behind (a drain holds it)."""
        now = self.clock()
        prev = self._head.get(partition)
        if self._reader.get(partition) != reader:  # a new consumer: a new hold starts
            self._reader[partition] = reader
            prev = None
        if head is None:
            self._head.pop(partition, None)
            return
        if prev is None or prev[0] != head or prev[2] != draining:
            self._head[partition] = (head, now, draining)
            self._head_chunks[partition] = self.chunks.get(user, 0)
            return
        if draining:
            # A drain hands its hold to a new token before each chunk: one record holds
            # the commit across at most two chunk reads (the one it was handed over at,
            # and the next, which hands it on), however long the lot.
            across = self.chunks.get(user, 0) - self._head_chunks.get(partition, 0)
            self.max_pinned_chunks = max(self.max_pinned_chunks, across)
            # (completions reach the consumer in batches: a few fast chunks may pass
            # before it hears of the hand-over, hence the time floor)
            late = across > 2 and now - prev[1] > PIN_CHUNK_GRACE_S
            if late and not any(v.startswith("commit_pinned") for v in self.violations):
                self.fail(
                    f"commit_pinned: p{partition} held at offset {head} by {user}'s drain "
                    f"across {across} chunks"
                )
        held = now - prev[1]
        self.max_head_s = max(self.max_head_s, held)
        if draining:
            self.max_pinned_s = max(self.max_pinned_s, held)
            if held > self.pin_bound_s and not any(
                v.startswith("commit_pinned") for v in self.violations
            ):
                self.fail(
                    f"commit_pinned: p{partition} held at offset {head} by a user's drain "
                    f"for {held:.1f}s (bound {self.pin_bound_s}s)"
                )

    def step_hook(self) -> None:
        if len(self.violations) > self.reported:
            self.reported = len(self.violations)
            raise Violation(self.violations[-1])

    # ------------------------------------------------------------ checked at the end

    def check_end(self, topic: Topic, parking: ParkingModel, host_pending: set[str]) -> None:
        for p, log in enumerate(topic.partitions):
            if topic.committed[p] < len(log):
                r = log[topic.committed[p]]
                where = "pending in a host" if r.message_id in host_pending else "not in a host"
                self.fail(
                    f"stuck: p{p} committed {topic.committed[p]} of {len(log)}; head "
                    f"{r.message_id} ({r.origin}) {where}"
                )
        for user, mid in sorted(parking.flags.items()):
            self.fail(f"parked_at_end: {user} still parked behind {mid}")
        for user, lot in sorted(parking.lots.items()):
            if lot:
                self.fail(f"parked_at_end: {user} has {len(lot)} parked message(s) left")
        for mid, m in self.msgs.items():
            ok = mid in self.succeeded and (
                mid in self.done or self.is_exempt(mid, ("mark_bypassed",))
            )
            if not ok and not (mid in self.review and self.letters.get(mid)):
                state = "succeeded, flag not durable" if mid in self.succeeded else "never done"
                self.fail(f"vanished: {mid} of {m.user}: {state}, not in manual review")

    def check_states(self) -> None:
        import json

        for user, mids in sorted(self.by_user.items()):
            raw = self.states.get(user, b"")
            seen: list[str] = list(json.loads(raw)["seen"]) if raw else []
            if len(set(seen)) != len(seen):
                twice = sorted({m for m in seen if seen.count(m) > 1})
                self.fail(f"state: {user}'s state applied {twice} more than once")
                continue
            done = [m for m in mids if m in self.done]
            if set(seen) != set(done):
                extra = sorted(set(seen) - set(done))
                missing = sorted(set(done) - set(seen))
                self.fail(f"state: {user}'s state has {extra} not done, lacks done {missing}")
                continue
            # Kafka order, as the order invariant defines it: a message applied after a
            # later one must be exempt or have been given up on first (a permanent
            # failure or manual review; a copy of it may still succeed later).
            for i, late in enumerate(seen):
                if self.is_exempt(late, ORDER_EXEMPT) or self.given_up(late):
                    continue
                overtaken = [
                    m
                    for m in seen[:i]
                    if self.msgs[m].seq > self.msgs[late].seq
                    and not self.is_exempt(m, ORDER_EXEMPT)
                ]
                if overtaken:
                    self.fail(f"state: {user}'s state applied {late} after the later {overtaken}")
                    break

    def given_up(self, mid: str) -> bool:
        """Failed for good (a non-parking dead letter) or sent to manual review."""
        return mid in self.review or any(
            not adapter.parks(lt.reason) for lt in self.letters.get(mid, ())
        )

"""The fakes around the real ingest objects, and the ledger that checks the invariants.

- `FakeWeCom`: per open_kfid an append-only log; `sync_msg` serves pages from a cursor
  (`g{generation}.{position}`), with has_more, short and empty pages, errcodes, cursors
  it stops accepting (40058) and a retention (WeCom's 3 days, scaled to the run).
- Kafka is in `kafka.py` (a fake librdkafka under the real producer).
- `Ledger`: what WeCom holds, what reached Kafka, what sits in the spool; it checks
    cursor_passed   the stored cursor moved past a message (with a msgid) that is in
                    neither Kafka nor the spool;
    order           per user, the first copies reaching Kafka are not in WeCom order;
    spool_unacked   an entry left the spool without a Kafka ack of that message;
    stalled         a message waited longer than `stall_bound_s` of fault-free time
                    (no window open) without reaching Kafka or the spool;
    not_drained     at the end (after a fault-free tail) a message is not in Kafka or
                    the spool is not empty;
    expired         a message left WeCom's retention before it was secured;
    dead_producer   (kafka.py) a producer instance that hit a fatal error refused a
                    record in fault-free time: it was never replaced.
"""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qywx_ray.envelope import Envelope
from tests.sim.trace import Trace
from tests.sim_ingest.faults import Scenario, Window

EPOCH_S = 1_700_000_000
PARTITIONS = 4
INVALID_CURSOR = 40058
SPOOL_PREFIX = b"qywx:spool:"
CURSOR_PREFIX = b"qywx:cursor:"


@dataclass
class Msg:
    mid: str  # "" when WeCom sent it without a msgid (exempt from the invariants)
    kfid: str
    idx: int  # position in the kfid's log
    user: str
    useq: int  # position among the user's messages
    created_at: float
    body: dict[str, Any]


@dataclass
class Page:
    errcode: int = 0
    errmsg: str = "ok"
    next_cursor: str = ""
    has_more: bool = False
    msg_list: list[dict[str, Any]] = field(default_factory=list)


class Faults:
    """Which windows are open now; the pause gate."""

    def __init__(self, sc: Scenario, clock: Callable[[], float], rng: random.Random) -> None:
        self.windows = list(sc.windows)
        self.clock = clock
        self.rng = rng
        self.ttl_s = sc.ttl_s
        self.unhealthy = _merge([(w.start, w.end) for w in sc.windows])
        self.on_pause: Callable[[Window], None] = lambda _w: None

    def maybe_stall(self, node: int, weight: float = 1.0) -> None:
        """Inside a `stalls` window, an IO call may start a pause of the node right here."""
        w = self.active("stalls", node)
        if w is None or self.rng.random() >= w.p * weight:
            return
        now = self.clock()
        pause = Window("pause", now, now + self.rng.uniform(0.5, 2.5) * self.ttl_s, node, 1.0)
        self.windows.append(pause)
        self.unhealthy = _merge([*self.unhealthy, (pause.start, pause.end)])
        self.on_pause(pause)

    def active(self, kind: str, node: int | None = None) -> Window | None:
        now = self.clock()
        for w in self.windows:
            if w.kind == kind and w.start <= now < w.end and (w.node is None or w.node == node):
                return w
        return None

    async def gate(self, node: int, stall_weight: float = 1.0) -> None:
        """A paused node's IO waits until the pause ends (its timers still fire)."""
        self.maybe_stall(node, stall_weight)
        while (w := self.active("pause", node)) is not None:
            await asyncio.sleep(w.end - self.clock())

    def unhealthy_now(self) -> bool:
        """Is any fault window (or pause) open now?"""
        now = self.clock()
        return any(s <= now < e for s, e in self.unhealthy)

    def healthy_time(self, t: float) -> float:
        """Fault-free time in [0, t]."""
        bad = sum(max(0.0, min(e, t) - s) for s, e in self.unhealthy if s < t)
        return t - bad


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def partition_of(user: str) -> int:
    return zlib.crc32(user.encode()) % PARTITIONS


class Ledger:
    def __init__(self, sc: Scenario, faults: Faults, trace: Trace, stall_bound_s: float) -> None:
        self.sc = sc
        self.faults = faults
        self.trace = trace
        self.stall_bound_s = stall_bound_s
        self.log: dict[str, list[Msg]] = {k: [] for k in sc.kfids}
        self.by_mid: dict[str, Msg] = {}
        self.in_kafka: set[str] = set()
        self.acked: set[str] = set()
        self.in_spool: Counter[str] = Counter()
        self.secured: set[str] = set()
        self.last_first: dict[str, int] = {}  # user -> useq of the last first copy
        self.verified_upto = dict.fromkeys(sc.kfids, 0)
        self.oldest_open = dict.fromkeys(sc.kfids, 0)
        self.kafka_records = 0
        self.violations: list[str] = []
        self._mid_of: dict[bytes, str] = {}

    def violate(self, text: str) -> None:
        self.trace.add(f"VIOLATION {text}")
        self.violations.append(text)

    # ---------------------------------------------------------------- WeCom side
    def add_message(self, m: Msg) -> None:
        self.log[m.kfid].append(m)
        if m.mid:
            self.by_mid[m.mid] = m

    # ---------------------------------------------------------------- Kafka side
    def kafka_append(self, env: Envelope, node: int, how: str) -> None:
        self.kafka_records += 1
        mid = env.message_id
        m = self.by_mid.get(mid)
        if m is None:
            self.violate(f"unknown: message {mid} reached Kafka but WeCom never sent it")
            return
        if env.external_userid != m.user:
            self.violate(f"key: {mid} keyed {env.external_userid}, sent by {m.user}")
        if mid not in self.in_kafka:
            last = self.last_first.get(m.user, -1)
            if m.useq < last:
                self.violate(
                    f"order: user {m.user}: first copy of {mid} (#{m.useq}) reached Kafka "
                    f"after the first copy of #{last}"
                )
            self.last_first[m.user] = max(last, m.useq)
            self.in_kafka.add(mid)
            self.secured.add(mid)
        self.trace.add(f"kafka <- {mid} (n{node}, {how})")

    def acked_now(self, mid: str) -> None:
        self.acked.add(mid)

    # ---------------------------------------------------------------- spool side
    def _mid(self, raw: bytes) -> str:
        mid = self._mid_of.get(raw)
        if mid is None:
            mid = self._mid_of[raw] = str(json.loads(raw).get("message_id", ""))
        return mid

    def spool_pushed(self, key: bytes, values: list[bytes]) -> None:
        if not key.startswith(SPOOL_PREFIX):
            return
        mids = [self._mid(v) for v in values]
        for mid in mids:
            self.in_spool[mid] += 1
            self.secured.add(mid)
        self.trace.add(f"spool += {key[len(SPOOL_PREFIX) :].decode()} {mids}")

    def spool_removed(self, key: bytes, values: list[bytes]) -> None:
        if not key.startswith(SPOOL_PREFIX):
            return
        mids = [self._mid(v) for v in values]
        for mid in mids:
            self.in_spool[mid] -= 1
            if mid not in self.acked:
                self.violate(f"spool_unacked: {mid} left the spool but Kafka never acked it")
        self.trace.add(f"spool -= {key[len(SPOOL_PREFIX) :].decode()} {mids}")

    # ---------------------------------------------------------------- checks
    def check_cursor(self, kfid: str, cursor: str) -> None:
        pos = position(cursor)
        if pos is None or pos <= self.verified_upto[kfid]:
            return
        log = self.log[kfid]
        for m in log[self.verified_upto[kfid] : pos]:
            if m.mid and m.mid not in self.secured:
                self.violate(
                    f"cursor_passed: {kfid} cursor {cursor} moved past {m.mid}, which is "
                    "neither in Kafka nor in the spool"
                )
                break
        self.verified_upto[kfid] = pos

    def check_stalls(self, now: float) -> None:
        for kfid, log in self.log.items():
            p = self.oldest_open[kfid]
            while p < len(log) and (not log[p].mid or log[p].mid in self.secured):
                p += 1
            self.oldest_open[kfid] = p
            if p == len(log):
                continue
            m = log[p]
            if now - m.created_at >= self.sc.retention_s:
                self.violate(f"expired: {m.mid} left WeCom's retention unsecured")
                self.oldest_open[kfid] = p + 1
                continue
            waited = self.faults.healthy_time(now) - self.faults.healthy_time(m.created_at)
            if waited > self.stall_bound_s:
                self.violate(
                    f"stalled: {kfid}: {m.mid} waited {waited:.0f}s of fault-free time "
                    f"(bound {self.stall_bound_s:.0f}s) without reaching Kafka or the spool"
                )
                self.oldest_open[kfid] = p + 1

    def drained(self) -> bool:
        return all(
            not m.mid or m.mid in self.in_kafka for log in self.log.values() for m in log
        ) and not any(self.in_spool.values())

    def check_end(self) -> None:
        for log in self.log.values():
            missing = [m.mid for m in log if m.mid and m.mid not in self.in_kafka]
            if missing:
                self.violate(
                    f"not_drained: {len(missing)} messages never reached Kafka, e.g. {missing[:5]}"
                )
                break
        left = sorted(mid for mid, n in self.in_spool.items() if n > 0)
        if left:
            self.violate(f"not_drained: spool still holds {left[:5]}")


def position(cursor: str) -> int | None:
    if not cursor:
        return None
    return int(cursor.rsplit(".", 1)[1])


class FakeWeCom:
    """kf/sync_msg over the ledger's logs (the `SyncSource` the syncers take)."""

    def __init__(
        self,
        sc: Scenario,
        ledger: Ledger,
        faults: Faults,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.sc = sc
        self.ledger = ledger
        self.faults = faults
        self.clock = clock
        self.rng = rng
        self.generation = dict.fromkeys(sc.kfids, 0)
        self.calls = 0

    def invalidate_cursors(self, kfid: str) -> None:
        self.generation[kfid] += 1

    def _first_retained(self, kfid: str) -> int:
        log = self.ledger.log[kfid]
        horizon = self.clock() - self.sc.retention_s
        i = 0
        while i < len(log) and log[i].created_at < horizon:
            i += 1
        return i

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> Page:
        self.calls += 1
        await asyncio.sleep(self.rng.uniform(0.005, 0.05))
        page = self._page(open_kfid, cursor, limit)
        n = len(page.msg_list)
        self.ledger.trace.add(
            f"sync_msg {open_kfid} cursor={cursor or '-'} -> errcode={page.errcode} n={n} "
            f"next={page.next_cursor or '-'} more={page.has_more}"
        )
        return page

    def _page(self, kfid: str, cursor: str, limit: int) -> Page:
        w = self.faults.active("wecom_errors")
        if w is not None and self.rng.random() < w.p:
            code = self.rng.choice((45009, -1, 50001))
            return Page(errcode=code, errmsg=f"simulated errcode {code}")
        log = self.ledger.log[kfid]
        gen = self.generation[kfid]
        first = self._first_retained(kfid)
        if not cursor:
            pos = first
        else:
            cgen, _, cpos = cursor[1:].partition(".")
            pos = int(cpos)
            if int(cgen) < gen or pos < first or pos > len(log):
                return Page(errcode=INVALID_CURSOR, errmsg="invalid cursor")
        k = min(limit, len(log) - pos)
        w = self.faults.active("wecom_pages")
        if w is not None and self.rng.random() < w.p:
            k = self.rng.randint(0, k)
        end = pos + k
        return Page(
            next_cursor=f"g{gen}.{end}",
            has_more=end < len(log),
            msg_list=[m.body for m in log[pos:end]],
        )

"""One seeded run of the ingest: two nodes, each with a KfSyncer per open_kfid and a
SpoolReplayer, racing over one (fake) Redis, one (fake) Kafka topic and a fake WeCom.

The objects under test are the real ones - KfSyncer (syncer.py), CursorStore, LockManager,
Spool and SpoolReplayer, ProducerBreaker - with their real Lua scripts, run by
`luaredis.FakeRedisServer`. Only WeCom, Kafka (the `BatchProducer`) and Redis' network are
fakes, and the clock is virtual (`tests/sim/vtime.py`): a run of minutes takes
milliseconds and a seed replays event for event. Invariants: see `world.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qywx_ray.ingest.breaker import ProducerBreaker
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.locks import LockManager
from qywx_ray.ingest.settings import IngestSettings
from qywx_ray.ingest.spool import Spool, SpoolReplayer
from qywx_ray.ingest.syncer import KfSyncer
from tests.sim.trace import Trace
from tests.sim.vtime import VirtualTimeLoop, run_virtual
from tests.sim_ingest.faults import NODES, Scenario, draw
from tests.sim_ingest.kafka import FakeKafka, NodeProducer
from tests.sim_ingest.luaredis import FakeRedisClient, FakeRedisServer, Reply
from tests.sim_ingest.world import (
    CURSOR_PREFIX,
    EPOCH_S,
    FakeWeCom,
    Faults,
    Ledger,
    Msg,
)

STALL_BOUND_S = 300.0  # fault-free seconds a message may wait before Kafka or the spool
TAIL_S = 900.0  # fault-free time after the last fault and message for everything to drain
REPLAY_INTERVAL_S = 2.0


@dataclass
class Result:
    seed: int
    violations: list[str]
    trace: list[str]
    summary: str
    virtual_s: float
    steps: int
    messages: int
    kafka_records: int
    producers_rebuilt: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def invariant(self) -> str:
        return self.violations[0].split(":", 1)[0] if self.violations else ""


class Node:
    """One ingest host: its own Redis connection, producer, breaker, syncers, replayer."""

    def __init__(self, sim: Simulation, node: int) -> None:
        self.sim = sim
        self.node = node
        sc = sim.sc
        self.rng = random.Random(sc.seed * 1000 + 17 + node)
        self.redis = FakeRedisClient(sim.server, self._round_trip)
        clock = sim.loop.time
        self.settings = IngestSettings(
            sync_page_limit=sc.page_limit,
            lock_ttl_s=sc.ttl_s,
            lock_extend_every_s=sc.extend_s,
            sweep_interval_s=30.0,
            backoff_initial_s=1.0,
            backoff_max_s=60.0,
            busy_retry_s=1.0,
            breaker_failure_threshold=sc.breaker_threshold,
            breaker_cooldown_s=10.0,
        )
        self.locks = LockManager(
            self.redis,  # type: ignore[arg-type]
            ttl_s=sc.ttl_s,
            extend_every_s=sc.extend_s,
            prefix="qywx:lock:",
            clock=clock,
        )
        self.cursors = CursorStore(self.redis, prefix="qywx:cursor:")  # type: ignore[arg-type]
        self.spool = Spool(self.redis, prefix="qywx", wall_clock=lambda: EPOCH_S + clock())  # type: ignore[arg-type]
        # The delivery wait equals the lock TTL, as the real defaults do.
        self.producer = NodeProducer(sim.kafka, node, sc.ttl_s)
        self.breaker = ProducerBreaker(
            failure_threshold=sc.breaker_threshold, cooldown_s=10.0, clock=clock
        )
        self.syncers = {
            k: KfSyncer(
                k,
                source=sim.wecom,
                producer=self.producer,
                locks=self.locks,
                cursors=self.cursors,
                spool=self.spool,
                breaker=self.breaker,
                settings=self.settings,
                clock=clock,
                rng=random.Random(sc.seed * 1000 + 41 + node).random,
            )
            for k in sc.kfids
        }
        self.replayer = SpoolReplayer(
            self.spool,
            self.producer,
            self.locks,
            breaker=self.breaker,
            max_per_user=sc.replay_per_user,
            max_batch=sc.replay_batch,
        )
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for syncer in self.syncers.values():
            self.tasks.append(
                asyncio.create_task(self._guard(f"syncer {syncer.open_kfid}", syncer.run()))
            )
        run = self.replayer.run(REPLAY_INTERVAL_S, self.stop)
        self.tasks.append(asyncio.create_task(self._guard("replayer", run)))

    async def _guard(self, what: str, coro: object) -> None:
        try:
            await coro  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a background loop must survive any exception
            self.sim.ledger.violate(f"loop_died: n{self.node} {what} died: {exc!r}")

    def halt(self) -> None:
        self.stop.set()
        for syncer in self.syncers.values():
            syncer.stop()

    async def _round_trip(self, apply: Callable[[], Reply]) -> Reply:
        f, r, trace = self.sim.faults, self.rng, self.sim.trace
        await f.gate(self.node)
        await asyncio.sleep(r.uniform(0.0005, 0.005))
        w = f.active("redis_slow", self.node)
        if w is not None and r.random() < w.p:
            delay_s = r.uniform(0.2, 2.0) * self.sim.sc.ttl_s
            trace.add(f"redis n{self.node}: slow round trip {delay_s:.2f}s")
            await asyncio.sleep(delay_s)
        w = f.active("lock_loss")
        if w is not None and r.random() < w.p:
            trace.add(f"redis: lock keys lost ({self.sim.server.delete_matching(b'qywx:lock:')})")
        if f.active("redis_down") or f.active("redis_partition", self.node):
            raise RedisConnectionError("simulated: redis unreachable")
        w = f.active("redis_flaky", self.node)
        if w is not None and r.random() < w.p:
            kind = r.choice(("blip", "lost_reply", "resend"))
            trace.add(f"redis n{self.node}: {kind}")
            if kind == "blip":
                raise RedisConnectionError("simulated: connection reset before the command")
            if kind == "lost_reply":
                apply()
                raise RedisTimeoutError("simulated: reply lost after the command ran")
            apply()  # redis-py resent it after a lost reply: the second reply counts
        reply = apply()
        await f.gate(self.node)  # a pause with the reply in flight
        return reply


class Simulation:
    def __init__(self, seed: int, without: frozenset[str], stall_bound_s: float) -> None:
        self.sc: Scenario = draw(seed, without)
        self.loop = VirtualTimeLoop()
        self.trace = Trace(self.loop.time)
        self.faults = Faults(self.sc, self.loop.time, random.Random(seed * 1000 + 7))
        self.faults.on_pause = lambda w: self.trace.add(f"PAUSE {w}")
        self.ledger = Ledger(self.sc, self.faults, self.trace, stall_bound_s)
        self.server = FakeRedisServer(lambda: self.loop.time() * 1000.0, epoch_s=EPOCH_S)
        self.server.on_list_pushed = self.ledger.spool_pushed
        self.server.on_list_removed = self.ledger.spool_removed
        self.server.watch_prefix = CURSOR_PREFIX
        self.checked_at = -1.0
        self.wecom = FakeWeCom(
            self.sc, self.ledger, self.faults, self.loop.time, random.Random(seed * 1000 + 3)
        )
        self.kafka = FakeKafka(
            self.ledger, self.faults, random.Random(seed * 1000 + 29), wait_s=self.sc.ttl_s
        )
        self.rng = random.Random(seed * 1000 + 5)
        self.nodes: list[Node] = []
        self.cursors_seen: dict[str, str] = {}
        self.stopped = False

    # ------------------------------------------------------------------ per step
    def on_step(self) -> None:
        if self.stopped:
            return
        now = self.loop.time()
        if self.server.watched_dirty:
            self.server.watched_dirty = False
            self._check_cursors()
        if now != self.checked_at:
            self.checked_at = now
            self.ledger.check_stalls(now)
        if self.ledger.violations:
            raise _Stop

    def _check_cursors(self) -> None:
        for kfid in self.sc.kfids:
            h = self.server.data.get(CURSOR_PREFIX + kfid.encode())
            raw = h.get(b"cursor", b"") if isinstance(h, dict) else b""
            cursor = raw.decode()
            if cursor != self.cursors_seen.get(kfid, ""):
                self.cursors_seen[kfid] = cursor
                self.trace.add(f"cursor {kfid} = {cursor or '-'}")
                self.ledger.check_cursor(kfid, cursor)

    # ------------------------------------------------------------------ the run
    def _messages(self) -> Iterator[Msg]:
        sc = self.sc
        r = random.Random(sc.seed * 1000 + 11)
        times = sorted(r.uniform(0, sc.active_s) for _ in range(sc.messages))
        useq: dict[str, int] = {}
        idx = dict.fromkeys(sc.kfids, 0)
        for n, t in enumerate(times):
            kfid = r.choice(sc.kfids)
            user = r.choice(sc.users[kfid])
            body: dict[str, object] = {
                "msgid": f"{kfid}-m{n}",
                "open_kfid": kfid,
                "external_userid": user,
                "send_time": EPOCH_S + int(t),
                "origin": 3,
                "msgtype": "text",
                "text": {"content": f"hello {n}"},
            }
            if r.random() < sc.malformed_p:
                bad = r.choice(("origin", "send_time"))
                body[bad] = None if bad == "origin" else f"{EPOCH_S + int(t)}.5"
            mid = str(body["msgid"])
            if r.random() < sc.no_msgid_p:
                del body["msgid"]
                mid = ""
            u = useq.get(user, 0)
            if mid:
                useq[user] = u + 1
            yield Msg(mid, kfid, idx[kfid], user, u, t, body)
            idx[kfid] += 1

    async def _event(self, kind: str, arg: str) -> None:
        self.trace.add(f"EVENT {kind} {arg}")
        if kind == "cursor_invalidate":
            self.wecom.invalidate_cursors(arg)
        elif kind == "fence_lost":
            for k in [k for k in self.server.data if k.endswith(b":fence")]:
                self.server.c_del(k)
        elif kind == "locks_deleted":
            self.server.delete_matching(b"qywx:lock:")
        elif kind == "cursor_lost":
            self.server.c_del(CURSOR_PREFIX + arg.encode())

    async def main(self) -> None:
        sc = self.sc
        self.nodes = [Node(self, n) for n in NODES]
        for node in self.nodes:
            node.start()
        timeline: list[tuple[float, int, object]] = [(m.created_at, 1, m) for m in self._messages()]
        timeline += [(e.t, 0, e) for e in sc.events]
        timeline.sort(key=lambda x: (x[0], x[1]))
        for t, _, item in timeline:
            await asyncio.sleep(max(0.0, t - self.loop.time()))
            if isinstance(item, Msg):
                self.ledger.add_message(item)
                if self.rng.random() >= sc.callback_loss_p:
                    node = self.rng.choice(self.nodes)
                    node.syncers[item.kfid].request_pull(f"tok{item.idx}")
                    self.trace.add(
                        f"callback {item.kfid} -> n{node.node} ({item.mid or 'no msgid'})"
                    )
            else:
                await self._event(item.kind, item.arg)  # type: ignore[attr-defined]
        quiet_from = max([sc.active_s, *(w.end for w in sc.windows)])
        await asyncio.sleep(max(0.0, quiet_from - self.loop.time()))
        quiet_from = max([quiet_from, *(w.end for w in self.faults.windows)])  # stalls
        await asyncio.sleep(max(0.0, quiet_from - self.loop.time()))
        deadline = quiet_from + TAIL_S
        while self.loop.time() < deadline and not self.ledger.drained():
            await asyncio.sleep(5.0)
        self.stopped = True
        for node in self.nodes:
            node.halt()
        self.ledger.check_end()

    def run(self) -> Result:
        self.loop.step_hooks.append(self.on_step)
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            with contextlib.suppress(_Stop):
                run_virtual(self.loop, self.main(), on_stop=self._halt_all)
        finally:
            logging.disable(previous)
        return Result(
            seed=self.sc.seed,
            violations=list(self.ledger.violations),
            trace=self.trace.tail(400),
            summary=self.sc.summary(),
            virtual_s=self.loop.time(),
            steps=self.loop.steps,
            messages=len(self.ledger.by_mid),
            kafka_records=self.ledger.kafka_records,
            producers_rebuilt=sum(n - 1 for n in self.kafka.instances.values()),
        )

    def _halt_all(self) -> None:
        self.stopped = True
        for node in self.nodes:
            node.halt()


class _Stop(Exception):
    """Raised from a step hook: a violation was found, end the run here."""


def run_seed(
    seed: int,
    without: frozenset[str] = frozenset(),
    stall_bound_s: float = STALL_BOUND_S,
    echo: bool = False,
) -> Result:
    sim = Simulation(seed, without, stall_bound_s)
    sim.trace.echo = echo
    return sim.run()

"""One simulated run: producer, partition consumers, hosts, DLQ recovery and faults on a
virtual-time loop, all decided by one seed.

The consumer model follows partition_consumer.py: it polls records from its position,
tracks them with the real `PartitionWatermark`, hands batches to the user's host, takes
completions addressed to its own name only, and commits the watermark. A consumer
restart (rebalance) or a host crash makes new consumers that start at the committed
offset: everything uncommitted is delivered again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from qywx_ray.consume.watermark import PartitionWatermark
from qywx_ray.envelope import Envelope
from tests.sim import adapter
from tests.sim.faults import Config, Faults
from tests.sim.invariants import Ledger, Violation
from tests.sim.trace import Trace
from tests.sim.vtime import SimulationStalled, VirtualTimeLoop, run_virtual
from tests.sim.world import (
    EPOCH_MS,
    TOPIC,
    FakeAdmission,
    FakeBatchReads,
    FakeDeadLetterSink,
    FakeDoneStore,
    FakeDrainTokens,
    FakeRetryOrder,
    ParkingModel,
    Recovery,
    Redis,
    Topic,
)

SEND_TIME0 = 1_700_000_000


class _ToTrace(logging.Handler):
    """qywx_ray's warnings and errors go to the running simulation's trace, not stderr."""

    def __init__(self, trace: Trace) -> None:
        super().__init__(logging.WARNING)
        self.trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None) or {}
        brief = " ".join(f"{k}={v}" for k, v in list(fields.items())[:4])
        self.trace.add(f"log {record.levelname.lower()} {record.getMessage()} {brief}")


SETTLE_S = 400.0  # virtual seconds after the faults stop for everything to finish
MAX_STEPS = 2_000_000


@dataclass
class Result:
    seed: int
    violations: list[str]
    trace: list[str]
    summary: str
    virtual_s: float
    steps: int
    messages: int
    handler_runs: int
    max_pinned_s: float
    max_head_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def invariant(self) -> str:
        return self.violations[0].split(":", 1)[0] if self.violations else ""


class PartitionConsumer:
    def __init__(self, sim: Simulation, partition: int, generation: int) -> None:
        self.sim = sim
        self.partition = partition
        self.name = f"c{partition}.{generation}"
        start = sim.topic.committed[partition]
        self.wm = PartitionWatermark(start=start)
        self.wm.committed = start
        self.pos = start

    def poll(self) -> int:
        sim = self.sim
        log = sim.topic.partitions[self.partition]
        n = min(sim.faults.batch_size(), len(log) - self.pos)
        if n <= 0:
            return 0
        groups: dict[int, list[adapter.Delivery]] = {}
        for r in log[self.pos : self.pos + n]:
            if not self.wm.add(r.offset):
                continue
            header = "" if not r.is_retry and sim.faults.drop_msg_id_header() else r.message_id
            d = adapter.Delivery(
                TOPIC,
                r.partition,
                r.offset,
                r.timestamp_ms,
                r.user,
                r.value,
                header,
                self.name,
                r.retry_count,
                r.is_retry,
                r.is_drain,
            )
            groups.setdefault(sim.host_of(r.user), []).append(d)
        self.pos += n
        for h, batch in groups.items():
            host = sim.hosts[h]
            assert host is not None
            sim.trace.add(
                f"{self.name} -> h{h}: "
                + " ".join(
                    f"{d.offset}:{sim.topic.partitions[d.partition][d.offset].message_id}"
                    f"{'(r)' if d.is_retry else ''}"
                    for d in batch
                )
            )
            host.accept(batch)
        return n

    def complete(self, offsets: list[int]) -> None:
        for o in offsets:
            self.wm.done(o)

    def commit(self) -> None:
        sim = self.sim
        c = self.wm.pending_commit()
        if c is None:
            return
        old = sim.topic.committed[self.partition]
        if c > old:
            sim.ledger.check_commit(sim.topic, sim.parking, self.partition, old, c)
            sim.topic.committed[self.partition] = c
            sim.trace.add(f"{self.name} commits {c}")
        self.wm.committed = c

    def observe(self) -> None:
        sim = self.sim
        head = self.wm.committable()
        if head is None or not self.wm.is_inflight(head):
            sim.ledger.observe_head(self.partition, None, False)
            return
        r = sim.topic.partitions[self.partition][head]
        draining = r.is_retry and sim.parking.flags.get(r.user) == r.message_id
        sim.ledger.observe_head(self.partition, head, draining, r.user, self.name)


class Simulation:
    def __init__(self, cfg: Config, pin_bound_s: float = 30.0, echo: bool = False) -> None:
        self.cfg = cfg
        self.loop = VirtualTimeLoop()
        clock = self.loop.time
        self.trace = Trace(clock, keep=None if echo else 400)
        self.trace.echo = echo
        self.faults = Faults(cfg)
        self.ledger = Ledger(clock, self.trace, pin_bound_s)
        self.topic = Topic(cfg.partitions)
        self.redis = Redis(self.faults, clock)
        self.parking = ParkingModel()
        self.retry_order = FakeRetryOrder(self.redis, self.parking, self.ledger, self.trace)
        self.retry_order.policy = cfg.policy
        self.done_store = FakeDoneStore(self.redis, self.ledger, self.trace)
        self.done_store.policy = cfg.policy
        self.by_send_time: dict[tuple[str, int], str] = {}
        self.admission = FakeAdmission(self.redis, self.ledger, self.trace, self.by_send_time)
        self.batch_reads = FakeBatchReads(
            self.redis, self.done_store, self.parking, self.ledger, self.trace
        )
        self.sink = FakeDeadLetterSink(self.faults, self.ledger, self.trace, clock)
        self.recovery = Recovery(
            self.topic,
            self.sink,
            self.redis,
            self.parking,
            self.ledger,
            self.trace,
            self.faults,
            clock,
        )
        self.tokens = FakeDrainTokens(self.topic, self.faults, self.trace, clock)
        self.hosts: list[adapter.Host | None] = [None] * cfg.hosts
        self.host_gen = [0] * cfg.hosts
        self.consumer_gen = [0] * cfg.partitions
        self.consumers: list[PartitionConsumer] = []
        self.by_name: dict[str, PartitionConsumer] = {}
        self.produced = False
        self.notes: list[str] = []

    # ------------------------------------------------------------ wiring

    def host_of(self, user: str) -> int:
        return zlib.crc32(b"host:" + user.encode()) % self.cfg.hosts

    def make_host(self, h: int) -> adapter.Host:
        self.host_gen[h] += 1
        name = f"h{h}.{self.host_gen[h]}"
        c = self.cfg
        return adapter.Host(
            name,
            handle=self.handle,
            done_store=self.done_store,
            admission=self.admission,
            retry_order=self.retry_order,
            batch_reads=self.batch_reads,
            drain_tokens=self.tokens,
            dead_letters=self.sink,
            complete=self.complete,
            options=adapter.HostOptions(
                mailbox_size=c.mailbox_size,
                idle_lifetime_s=c.idle_lifetime_s,
                handler_timeout_s=c.handler_timeout_s,
                handler_concurrency=c.handler_concurrency,
                breaker=c.breaker,
                policy=c.policy,
                drain_chunk=c.drain_chunk,
            ),
            clock=self.loop.time,
            wall_ms=lambda: EPOCH_MS + int(self.loop.time() * 1000),
            on_fatal=lambda why: self.on_fatal(h, why),
            on_task_died=lambda what: self.task_died(name, what),
        )

    def on_fatal(self, h: int, why: str) -> None:
        """HostCore asks its shell to crash (crash-only): do it from the loop."""
        self.loop.call_soon(self.crash_host, h, f"on_fatal: {why}")

    def task_died(self, host: str, what: str) -> None:
        note = f"{host}: task ended unexpectedly: {what}"
        self.trace.add(note)
        self.notes.append(note)

    def restart_consumers(self, partitions: list[int]) -> None:
        for p in partitions:
            self.consumer_gen[p] += 1
            c = PartitionConsumer(self, p, self.consumer_gen[p])
            old = self.consumers[p] if p < len(self.consumers) else None
            if old is not None:
                self.by_name.pop(old.name, None)
                self.consumers[p] = c
            else:
                self.consumers.append(c)
            self.by_name[c.name] = c
            self.trace.add(f"consumer {c.name} starts at {c.pos}")

    def complete(self, consumer: str, done: Any) -> None:
        c = self.by_name.get(consumer)
        if c is None:
            return  # addressed to a consumer that was replaced
        c.complete([o for _, p, o in done if p == c.partition])

    def crash_host(self, h: int, why: str) -> None:
        host = self.hosts[h]
        if host is None:
            return
        self.trace.add(f"CRASH {host.name} ({why})")
        host.crash()
        self.hosts[h] = None
        self.loop.call_later(self.faults.restart_delay(), self.restart_host, h)

    def restart_host(self, h: int) -> None:
        self.hosts[h] = self.make_host(h)
        self.trace.add(f"host {self.hosts[h].name} started")  # type: ignore[union-attr]
        self.restart_consumers(list(range(self.cfg.partitions)))

    # ------------------------------------------------------------ the handler

    async def handle(self, mid: str, user: str, attempt: int, state_seen: list[str]) -> None:
        self.ledger.on_handler_start(mid, attempt)
        self.ledger.on_handler_state(mid, user, state_seen)
        outcome = self.faults.outcome()
        t = self.faults.handler_time()
        if t:
            await asyncio.sleep(t)
        if outcome == "ok":
            if self.redis.down():  # the handler's own Redis calls fail as well
                self.trace.add(f"handler {mid}: redis down")
                raise adapter.InfraError("redis down (handler)")
            self.ledger.on_handler_success(mid)
            return
        self.trace.add(f"handler {mid}: {outcome}")
        if outcome == "retryable":
            raise RuntimeError("downstream unavailable")
        if outcome == "permanent":
            raise adapter.PermanentError("can never be processed")
        if outcome == "timeout":
            await asyncio.sleep(self.cfg.handler_timeout_s * 4)
            self.ledger.on_handler_success(mid)  # the watchdog should have stopped it
            return
        if outcome == "cancel":
            raise asyncio.CancelledError()
        raise adapter.InfraError("redis blip in handler")

    # ------------------------------------------------------------ actors of the run

    async def producer(self) -> None:
        r = random.Random(f"producer:{self.cfg.seed}")
        times = sorted(r.uniform(0, self.cfg.produce_span_s) for _ in range(self.cfg.messages))
        if r.random() < 0.5:  # a burst: many at one instant
            k = r.randrange(len(times))
            times = sorted([*times[:k], *[times[k]] * (len(times) - k)])
        counts: dict[str, int] = {}
        for i, at in enumerate(times):
            await asyncio.sleep(max(0.0, at - self.loop.time()))
            user = f"u{r.randrange(self.cfg.users)}"
            n = counts[user] = counts.get(user, 0) + 1
            mid = f"{user}-{n}"
            send_time = SEND_TIME0 + i
            env = Envelope(
                message_id=mid,
                open_kfid="kf",
                external_userid=user,
                msgtype="text",
                send_time=send_time,
                ingest_ts_ms=EPOCH_MS + int(self.loop.time() * 1000),
            )
            self.by_send_time[(user, send_time)] = mid
            self.ledger.add_message(mid, user)
            rec = self.topic.produce(user, mid, env.to_bytes(), self.loop.time())
            self.trace.add(f"produce {mid} p{rec.partition}@{rec.offset}")
        self.produced = True

    async def consumers_loop(self) -> None:
        while True:
            moved = 0
            if all(h is not None for h in self.hosts):
                for c in list(self.consumers):
                    moved += c.poll()
            for c in list(self.consumers):
                c.commit()
                c.observe()
            tick = self.faults.poll_tick()
            await asyncio.sleep(tick if moved else tick * 4)

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for host in self.hosts:
                if host is not None:
                    host.sweep()

    def schedule_faults(self) -> None:
        loop = self.loop
        for at, dur in self.cfg.redis_outages:

            def down(dur: float = dur) -> None:
                self.redis.down_until = max(self.redis.down_until, loop.time() + dur)
                self.trace.add(f"REDIS DOWN for {dur:.3f}s")

            loop.call_at(at, down)
        for at, h in self.cfg.host_crashes:
            loop.call_at(at, self.crash_host, h, "injected")
        for at, p in self.cfg.consumer_restarts:
            loop.call_at(at, self.restart_consumers, [p])

    def quiescent(self) -> bool:
        return (
            self.produced
            and self.topic.all_committed()
            and self.recovery.idle()
            and all(h is not None and h.quiet() for h in self.hosts)
        )

    async def main(self) -> None:
        loop = self.loop
        for h in range(self.cfg.hosts):
            self.hosts[h] = self.make_host(h)
        self.restart_consumers(list(range(self.cfg.partitions)))
        bg = [
            loop.create_task(self.producer()),
            loop.create_task(self.consumers_loop()),
            loop.create_task(self.recovery.run()),
        ]
        if self.cfg.idle_lifetime_s < 100:
            bg.append(loop.create_task(self.sweeper()))
        self.schedule_faults()
        await asyncio.sleep(self.cfg.fault_span_s)
        self.faults.active = False
        self.redis.down_until = -1.0
        self.trace.add("faults stop")
        deadline = loop.time() + SETTLE_S
        while loop.time() < deadline and not self.quiescent():
            await asyncio.sleep(0.5)
        pending: set[str] = set()
        for host in self.hosts:
            if host is not None:
                pending |= host.pending_ids()
        self.trace.add("end checks")
        self.ledger.check_end(self.topic, self.parking, pending)
        self.ledger.check_states()
        for t in bg:
            t.cancel()

    # ------------------------------------------------------------ run

    def stop_hosts(self) -> None:
        for h in self.hosts:
            if h is not None:
                h.dead = True

    def run(self) -> Result:
        loop = self.loop
        adapter.install_task_registry(loop)
        loop.set_exception_handler(lambda _l, ctx: self.trace.add(f"loop: {ctx.get('message')}"))

        def guard() -> None:
            self.ledger.step_hook()
            if loop.steps > MAX_STEPS:
                raise SimulationStalled(f"more than {MAX_STEPS} loop steps (livelock?)")

        loop.step_hooks.append(guard)
        qlog = logging.getLogger("qywx_ray")
        saved = (qlog.level, qlog.propagate, random.getstate())
        to_trace = _ToTrace(self.trace)
        qlog.addHandler(to_trace)
        qlog.setLevel(logging.WARNING)
        qlog.propagate = False
        random.seed(self.cfg.seed)  # HostCore's retry jitter uses the global random
        violations: list[str] = []
        try:
            run_virtual(loop, self.main(), self.stop_hosts)
        except Violation:
            pass
        except SimulationStalled as exc:
            violations.append(f"stalled: {exc}")
        finally:
            qlog.removeHandler(to_trace)
            qlog.setLevel(saved[0])
            qlog.propagate = saved[1]
            random.setstate(saved[2])
        violations = self.ledger.violations + violations
        return Result(
            seed=self.cfg.seed,
            violations=violations,
            trace=list(self.trace.events),
            summary=self.cfg.summary(),
            virtual_s=loop.time(),
            steps=loop.steps,
            messages=self.cfg.messages,
            handler_runs=self.ledger.handler_runs,
            max_pinned_s=self.ledger.max_pinned_s,
            max_head_s=self.ledger.max_head_s,
            notes=self.notes,
        )


def run_seed(
    seed: int,
    *,
    without: frozenset[str] = frozenset(),
    pin_bound_s: float = 30.0,
    echo: bool = False,
) -> Result:
    return Simulation(Config.draw(seed, without), pin_bound_s, echo).run()

"""Fake Kafka for the ingest simulator, under the REAL `KafkaIngestProducer`.

The syncers and replayers of a node share one `KafkaIngestProducer` - the real class, with
its batch waiter, held-behind rule, delivery wait timeout and fatal-error rebuild - whose
librdkafka instance is a `FakeLibrdkafka` (through the producer's `_new_client` seam) and
whose delivery reports come on the virtual clock instead of a poll thread. So a defect
in how the producer handles a fatal error (it rebuilds its client) is what runs here.

What one librdkafka instance does, as the simulator sees it:
- `produce()` queues a record; the records queued in one go (a batch, up to the
  producer's yield) are sent together on the next loop step. Per the open windows:
  `kafka_down` - nothing acked, some partitions' prefixes written anyway; `kafka_flaky` -
  a record fails and with it the rest of its partition in that send (the idempotent
  producer keeps order), or the reports come after the delivery wait (what was written is
  reported ok late, the rest failed); slow reports while Kafka is troubled.
- `kafka_fatal` (one node or all): a send may hit a fatal error (idempotence fenced, out
  of sequence): `error_cb` gets it, every record the instance still holds is reported
  failed (a prefix of some partitions was written: duplicates later), and from then on
  the instance refuses every `produce()` with the fatal `KafkaException` - a produce may
  also be the call that hits it. A dead instance never heals: only a new one (the
  producer's rebuild) sends again.
- `purge()` reports what it still holds as failed; `flush()` returns what it holds.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from qywx_ray.envelope import Envelope
from qywx_ray.ingest.producer import BatchResult, KafkaIngestProducer
from qywx_ray.kafka.settings import KafkaSettings
from tests.sim_ingest.world import Faults, Ledger, partition_of

DeliveryCallback = Callable[[KafkaError | None, Any], None]


class _Report:
    """The message object a delivery callback gets (partition and offset only)."""

    __slots__ = ("_offset", "_partition")

    def __init__(self, partition: int, offset: int) -> None:
        self._partition = partition
        self._offset = offset

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


@dataclass
class _Record:
    env: Envelope
    partition: int
    cb: DeliveryCallback
    written: bool = False  # reached the topic
    reported: bool = False


class FakeLibrdkafka:
    """One librdkafka producer instance of one node (see the module docstring)."""

    def __init__(self, cluster: FakeKafka, node: int, generation: int, error_cb: Any) -> None:
        self.cluster = cluster
        self.node = node
        self.generation = generation
        self.error_cb = error_cb
        self.fatal: KafkaError | None = None
        self.queued: list[_Record] = []
        self.unreported: list[_Record] = []

    @property
    def name(self) -> str:
        return f"n{self.node}.p{self.generation}"

    # ------------------------------------------------------------ the librdkafka surface
    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes,
        headers: Any = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        c = self.cluster
        if self.fatal is None:
            w = c.faults.active("kafka_fatal", self.node)
            if w is not None and c.rng.random() < w.p / 4:
                self._die("on produce")
        if self.fatal is not None:
            c.refused_by_dead(self)
            raise KafkaException(self.fatal)
        env = Envelope.from_bytes(value)
        assert on_delivery is not None
        self.queued.append(_Record(env, partition_of(env.external_userid), on_delivery))
        if len(self.queued) == 1:
            asyncio.get_running_loop().call_soon(self._send)

    def poll(self, timeout: float = 0) -> int:
        return 0  # reports are served on the virtual clock as they come

    def flush(self, timeout: float = 0) -> int:
        return len(self)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        held = [r for r in self.queued + self.unreported if not r.reported]
        self.queued = []
        for rec in held:
            self._report_later(rec, KafkaError(KafkaError._PURGE_INFLIGHT), 0.0)
        if held:
            self.cluster.trace(f"producer {self.name}: purged {len(held)} records")

    def __len__(self) -> int:
        return len(self.queued) + sum(1 for r in self.unreported if not r.reported)

    # ------------------------------------------------------------ what Kafka does
    def _send(self) -> None:
        batch, self.queued = self.queued, []
        if not batch or self.fatal is not None:
            return
        c, r = self.cluster, self.cluster.rng
        down, flaky = c.faults.active("kafka_down"), c.faults.active("kafka_flaky")
        fatal = c.faults.active("kafka_fatal", self.node)
        troubled = down or flaky or fatal
        delay_s = (
            r.uniform(0.3, 1.0) * c.wait_s
            if troubled and r.random() < 0.5
            else r.uniform(0.002, 0.03)
        )
        self.unreported += batch
        if fatal is not None and r.random() < fatal.p:
            self._write_prefixes(batch, 0.5)
            self._die("in flight")
            return
        timeout = flaky is not None and r.random() < flaky.p
        if down or timeout:
            self._write_prefixes(batch, 0.3 if down else 1.0)
            late_s = r.uniform(1.05, 1.5) * c.wait_s if timeout else delay_s
            for rec in batch:
                # A written record's report says ok (late); the rest failed.
                err = None if rec.written and timeout else KafkaError(KafkaError._MSG_TIMED_OUT)
                self._report_later(rec, err, late_s)
            why = "timeout" if timeout else "down"
        else:
            failed_parts: set[int] = set()
            for rec in batch:
                if rec.partition in failed_parts or (flaky is not None and r.random() < flaky.p):
                    failed_parts.add(rec.partition)
                    self._report_later(rec, KafkaError(KafkaError.NOT_ENOUGH_REPLICAS), delay_s)
                    continue
                self._write(rec, "acked")
                self._report_later(rec, None, delay_s)
            why = "record_failures" if failed_parts else "ok"
        c.trace(f"send {self.name}: {len(batch)} records ({why})")

    def _write_prefixes(self, batch: Sequence[_Record], p: float) -> None:
        """Some partitions' prefixes reached the topic although the send failed."""
        r = self.cluster.rng
        for part in sorted({rec.partition for rec in batch}):
            if r.random() < p:
                recs = [rec for rec in batch if rec.partition == part]
                for rec in recs[: r.randint(0, len(recs))]:
                    self._write(rec, "unreported")

    def _write(self, rec: _Record, how: str) -> None:
        rec.written = True
        self.cluster.ledger.kafka_append(rec.env, self.node, how)

    def _die(self, where: str) -> None:
        """A fatal error: reported to error_cb, every held record failed, nothing more."""
        self.fatal = KafkaError(KafkaError._FATAL, f"simulated fatal error {where}", fatal=True)
        self.cluster.trace(f"FATAL producer {self.name} ({where})")
        self.error_cb(self.fatal)
        held = [r for r in self.queued + self.unreported if not r.reported]
        self.queued = []
        for rec in held:
            self._report_later(rec, self.fatal, 0.0)

    def _report_later(self, rec: _Record, err: KafkaError | None, delay_s: float) -> None:
        asyncio.get_running_loop().call_later(delay_s, self._report, rec, err)

    def _report(self, rec: _Record, err: KafkaError | None) -> None:
        if rec.reported:
            return
        rec.reported = True
        self.unreported.remove(rec)
        if err is None:
            self.cluster.ledger.acked_now(rec.env.message_id)
        rec.cb(err, _Report(rec.partition, 0))


class FakeKafka:
    """The topic side shared by the nodes: the ledger, the fault windows, one RNG."""

    def __init__(self, ledger: Ledger, faults: Faults, rng: random.Random, wait_s: float) -> None:
        self.ledger = ledger
        self.faults = faults
        self.rng = rng
        self.wait_s = wait_s
        self.instances: dict[int, int] = {}  # node -> librdkafka instances created

    def trace(self, text: str) -> None:
        self.ledger.trace.add(text)

    def client(self, node: int, error_cb: Any) -> FakeLibrdkafka:
        generation = self.instances.get(node, 0) + 1
        self.instances[node] = generation
        if generation > 1:
            self.trace(f"producer n{node} rebuilt: instance p{generation}")
        return FakeLibrdkafka(self, node, generation, error_cb)

    def refused_by_dead(self, instance: FakeLibrdkafka) -> None:
        """A produce on a fatally failed instance. Inside a fault window that is the cost
        of the error; in fault-free time it means the instance was never replaced."""
        if not self.faults.unhealthy_now():
            self.ledger.violate(
                f"dead_producer: {instance.name} refused a record in fault-free time "
                f"({instance.fatal.str() if instance.fatal else ''}): a producer that hit "
                "a fatal error is still in use"
            )


class SimIngestProducer(KafkaIngestProducer):
    """The real producer, on a fake librdkafka, without a poll thread."""

    def __init__(self, cluster: FakeKafka, node: int, delivery_wait_timeout_s: float) -> None:
        self._cluster = cluster
        self._node = node
        super().__init__(KafkaSettings(), delivery_wait_timeout_s=delivery_wait_timeout_s)

    def _new_client(self) -> Any:
        return self._cluster.client(self._node, self._conf["error_cb"])

    def _start_poll_thread(self) -> None:
        return None


class NodeProducer:
    """The `BatchProducer` a node's syncers and replayer use: the node's real producer,
    behind its pause gate (a pause may start before the batch, or between the delivery
    reports and the caller seeing them - the longest wait of a pull or a replay round,
    so where a stall most often lands in production too)."""

    def __init__(self, cluster: FakeKafka, node: int, delivery_wait_timeout_s: float) -> None:
        self.producer = SimIngestProducer(cluster, node, delivery_wait_timeout_s)
        self.cluster = cluster
        self.faults = cluster.faults
        self.node = node

    async def produce_batch(self, envelopes: Sequence[Envelope]) -> BatchResult:
        await self.faults.gate(self.node)
        result = await self.producer.produce_batch(envelopes)
        await self.faults.gate(self.node, stall_weight=5.0)
        self.cluster.trace(
            f"produce n{self.node}: {len(envelopes)} records, {len(result.acked)} acked"
        )
        return result

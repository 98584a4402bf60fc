"""Asynchronous Kafka producer for message envelopes (three send modes, done right).

Config comes only from qywx_ray.kafka.config.producer_config (idempotent, acks=all,
lz4, murmur2_random). Delivery reports are served on one dedicated poll thread; no
caller ever waits on librdkafka. A full local queue (BufferError) is back-pressure:
we poll and retry within a bound, and never drop a message - a message that cannot be
queued is reported as a failed delivery so the caller can spool it.

Send modes: `produce_nowait` (fire-and-forget), `produce` (callback),
`await produce_confirmed` (one message), and what the pipeline uses,
`await produce_batch` (produce a whole page, then await every delivery report).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from qywx_ray.ingest.loops import LoopBackoff, loop_failed
from qywx_ray.kafka.config import producer_config
from qywx_ray.kafka.settings import KafkaSettings
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)

PRODUCED = metrics.counter("qywx_produced_total", "Envelopes acknowledged by Kafka")
PRODUCE_ERRORS = metrics.counter(
    "qywx_produce_errors_total", "Envelopes Kafka did not acknowledge (or that could not queue)"
)
PRODUCE_LATENCY = metrics.histogram(
    "qywx_produce_latency_seconds", "From produce() to the delivery report, per envelope"
)
PRODUCER_REBUILT = metrics.counter(
    "qywx_producer_rebuilt_total",
    "Ingest producers replaced after a fatal librdkafka error (e.g. idempotence fenced)",
)
PRODUCE_BACKPRESSURE = metrics.counter(
    "qywx_produce_backpressure_total", "Produces that found the local queue full and waited"
)

_YIELD_EVERY = 256  # produce_batch yields to the event loop this often


class ProduceError(InfraError):
    """A message could not be delivered to Kafka (carries the librdkafka error if any)."""

    def __init__(self, message: str, kafka_error: KafkaError | None = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error


class HeldBehind(ProduceError):
    """Not sent: an earlier record of the same user in the batch failed (says nothing
    about Kafka's health, so breakers do not count it)."""


@dataclass(slots=True)
class Delivery:
    """The outcome for one envelope: error is None when Kafka acknowledged it."""

    envelope: Envelope
    error: Exception | None = None
    partition: int | None = None
    offset: int | None = None
    # To the delivery report from the produce call (from produce_batch's start in a batch).
    latency_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BatchResult:
    """Per-envelope outcomes, in the order the envelopes were given."""

    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.deliveries)

    @property
    def acked(self) -> list[Envelope]:
        return [d.envelope for d in self.deliveries if d.ok]

    @property
    def failed(self) -> list[Delivery]:
        return [d for d in self.deliveries if not d.ok]

    def __len__(self) -> int:
        return len(self.deliveries)


class BatchProducer(Protocol):
    """What the syncer and the spool replayer need from a producer."""

    async def produce_batch(self, envelopes: Sequence[Envelope]) -> BatchResult: ...


class _BatchWaiter:
    """Collects delivery reports of one batch on the poll thread; wakes the loop once."""

    __slots__ = (
        "closed",
        "done",
        "errors",
        "future",
        "latencies",
        "lock",
        "loop",
        "offsets",
        "partitions",
        "remaining",
        "started",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int, started: float) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.lock = threading.Lock()
        self.remaining = n
        self.errors: list[Exception | None] = [None] * n
        self.partitions: list[int | None] = [None] * n
        self.offsets: list[int | None] = [None] * n
        self.done: list[bool] = [False] * n
        self.latencies: list[float | None] = [None] * n
        self.started = started
        self.closed = False
        if n == 0:
            self.future.set_result(None)

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def settle(
        self, idx: int, error: Exception | None, partition: int | None, offset: int | None
    ) -> None:
        with self.lock:
            if self.closed or self.done[idx]:
                return
            self.done[idx] = True
            self.errors[idx] = error
            self.partitions[idx] = partition
            self.offsets[idx] = offset
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self.loop.call_soon_threadsafe(self._finish)

    def on_delivery(self, idx: int, err: KafkaError | None, msg: Message) -> None:
        latency_s = time.monotonic() - self.started
        if err is None:
            PRODUCE_LATENCY.observe(latency_s)
            self.latencies[idx] = latency_s
            self.settle(idx, None, msg.partition(), msg.offset())
        else:
            self.settle(idx, ProduceError(f"delivery failed: {err.str()}", err), None, None)


class KafkaIngestProducer:
    """One librdkafka producer + one poll thread. Thread-safe; async methods need a loop."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        topic: str | None = None,
        delivery_wait_timeout_s: float = 30.0,
        produce_block_timeout_s: float = 10.0,
        **extra_config: Any,
    ) -> None:
        self.topic = topic or kafka.main_topic.name
        self.delivery_wait_timeout_s = delivery_wait_timeout_s
        self.produce_block_timeout_s = produce_block_timeout_s
        extra_config.setdefault("logger", logging.getLogger("qywx_ray.kafka.librdkafka"))
        self._conf = producer_config(kafka, error_cb=self._on_error, **extra_config)
        self._producer = self._new_client()
        self._rebuild_lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._last_error_log = 0.0
        self._fatal_error: KafkaError | None = None
        self._thread = self._start_poll_thread()

    # ------------------------------------------------------------------ plumbing
    def _new_client(self) -> Producer:
        """A librdkafka instance from the one config (at start and after a fatal error).
        A seam: the ingest simulator returns its fake Kafka client here."""
        return Producer(self._conf)

    def _start_poll_thread(self) -> threading.Thread | None:
        """The thread that serves delivery reports. A seam: the ingest simulator, whose
        fake client reports on its virtual clock, starts none."""
        thread = threading.Thread(
            target=self._poll_loop, name=f"kafka-poll-{self.topic}", daemon=True
        )
        thread.start()
        return thread

    def _poll_loop(self) -> None:
        """Serve delivery reports until close(). Nothing else ends it: an exception (a
        callback raised) is logged and counted, and polling goes on after a short pause
        that doubles while poll keeps raising - delivery reports must never stop."""
        backoff = LoopBackoff(0.01, 1.0)
        while not self._stop.is_set():
            try:
                self._producer.poll(0.1)
                backoff.succeeded()
            except Exception as exc:  # noqa: BLE001 - the poll thread must survive anything (counted, backed off)
                loop_failed("kafka_poll", exc, topic=self.topic)
                self._stop.wait(backoff.failed())

    @property
    def fatal_error(self) -> KafkaError | None:
        """Set when librdkafka reports a fatal error: this producer must be replaced."""
        return self._fatal_error

    def _renew_if_fatal(self) -> None:
        """Replace the librdkafka instance after a fatal error, before the next produce.

        A fatal error (e.g. the idempotent producer fenced or out of sequence) makes every
        later produce on that instance fail: without a new one everything would be spooled,
        the replayer would use the same dead producer, and the spool would grow until
        Redis is full. Whatever the old instance still held is purged, so its delivery
        reports come back failed now (callers spool those) instead of at the wait timeout.
        """
        if self._fatal_error is None or self._closed:
            return
        with self._rebuild_lock:
            err = self._fatal_error
            if err is None:
                return
            old = self._producer
            self._producer = self._new_client()
            self._fatal_error = None
        PRODUCER_REBUILT.inc()
        log.error("kafka.producer_rebuilt_after_fatal_error", error=err.str(), topic=self.topic)
        try:
            old.purge(in_queue=True, in_flight=True, blocking=False)
            old.poll(0)  # serve the purged records' failure reports
        except Exception:  # the old instance is beyond use anyway
            log.warning("kafka.dead_producer_purge_failed", exc_info=True, topic=self.topic)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal_error = err
        now = time.monotonic()
        if err.fatal() or now - self._last_error_log > 10.0:
            self._last_error_log = now
            log.warning("kafka.producer_error", error=err.str(), code=err.code(), fatal=err.fatal())

    def _try_produce(self, env: Envelope, value: bytes, cb: Callable[..., None]) -> bool:
        """Queue one record; False when the local queue is full (BufferError)."""
        headers = cast("list[tuple[str, str | bytes | None]]", env.headers())
        try:
            self._producer.produce(
                self.topic, value=value, key=env.key, headers=headers, on_delivery=cb
            )
            return True
        except BufferError:
            return False

    def _produce_blocking(self, env: Envelope, cb: Callable[..., None]) -> None:
        """Back-pressure for the synchronous modes: poll and retry within a bound."""
        if self._closed:
            raise ProduceError("producer is closed")
        self._renew_if_fatal()
        value = env.to_bytes()
        if self._try_produce(env, value, cb):
            return
        PRODUCE_BACKPRESSURE.inc()
        deadline = time.monotonic() + self.produce_block_timeout_s
        while not self._try_produce(env, value, cb):
            self._raise_if_past(deadline)
            self._producer.poll(0.005)

    def _raise_if_past(self, deadline: float) -> None:
        """Back-pressure is bounded: a local queue full past `deadline` is a produce error."""
        if time.monotonic() > deadline:
            raise ProduceError(
                f"local producer queue stayed full for {self.produce_block_timeout_s}s"
            )

    async def _queue_when_room(self, env: Envelope, value: bytes, cb: Callable[..., None]) -> None:
        """Back-pressure for the async modes: the poll thread drains; retry within a bound."""
        PRODUCE_BACKPRESSURE.inc()
        deadline = time.monotonic() + self.produce_block_timeout_s
        while not self._try_produce(env, value, cb):
            self._raise_if_past(deadline)
            await asyncio.sleep(0.005)

    @staticmethod
    def _count(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            PRODUCED.inc()
        else:
            PRODUCE_ERRORS.inc()

    # ------------------------------------------------------------------ send modes
    def produce_nowait(self, envelope: Envelope) -> None:
        """Fire-and-forget: queued or ProduceError; the outcome is only counted."""
        self._produce_blocking(envelope, self._count)

    def produce(self, envelope: Envelope, on_delivery: Callable[[Delivery], None]) -> None:
        """Callback mode: `on_delivery(Delivery)` runs on the poll thread; keep it short."""
        started = time.monotonic()

        def cb(err: KafkaError | None, msg: Message) -> None:
            self._count(err, msg)
            if err is None:
                latency_s = time.monotonic() - started
                PRODUCE_LATENCY.observe(latency_s)
                on_delivery(Delivery(envelope, None, msg.partition(), msg.offset(), latency_s))
            else:
                on_delivery(Delivery(envelope, ProduceError(f"delivery failed: {err.str()}", err)))

        self._produce_blocking(envelope, cb)

    async def produce_confirmed(self, envelope: Envelope) -> Delivery:
        """Confirmed mode for one message; raises ProduceError if it was not acknowledged."""
        result = await self.produce_batch([envelope])
        delivery = result.deliveries[0]
        if delivery.error is not None:
            raise delivery.error
        return delivery

    async def produce_batch(self, envelopes: Sequence[Envelope]) -> BatchResult:
        """Produce all, then await all delivery reports (bounded by delivery_wait_timeout_s).

        Never raises for Kafka trouble: every envelope gets a Delivery, failed ones carry
        the error. A report that does not come in time counts as failed (the message may
        still arrive later: a duplicate, never a loss, once the caller spools it).
        """
        self._renew_if_fatal()
        loop = asyncio.get_running_loop()
        n = len(envelopes)
        waiter = _BatchWaiter(loop, n, time.monotonic())
        try:
            await self._produce_all(envelopes, waiter)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.delivery_wait_timeout_s):
                    await asyncio.shield(waiter.future)
        finally:
            with waiter.lock:
                waiter.closed = True  # late reports (after a timeout or cancel) are ignored
        timed_out = ProduceError(f"no delivery report within {self.delivery_wait_timeout_s}s")
        deliveries = [
            Delivery(
                env,
                waiter.errors[i] if waiter.done[i] else timed_out,
                waiter.partitions[i],
                waiter.offsets[i],
                waiter.latencies[i],
            )
            for i, env in enumerate(envelopes)
        ]
        result = BatchResult(deliveries)
        ok = sum(1 for d in deliveries if d.ok)
        if ok:
            PRODUCED.inc(ok)
        if ok < n:
            PRODUCE_ERRORS.inc(n - ok)
        return result

    async def _produce_all(self, envelopes: Sequence[Envelope], waiter: _BatchWaiter) -> None:
        """Queue every record. Once one of a user's records could not even be queued, that
        user's later records in the batch are not queued either (failed, "held"): the
        caller spools them behind it, so a record retried later never lands behind a
        later one of the same user that went straight to Kafka."""
        failed_users: set[str] = set()
        for idx, env in enumerate(envelopes):
            if idx and idx % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if self._closed:
                waiter.settle(idx, ProduceError("producer is closed"), None, None)
                continue
            if env.external_userid in failed_users:
                held = HeldBehind("held behind an earlier record of this user that failed")
                waiter.settle(idx, held, None, None)
                continue
            try:
                value = env.to_bytes()
                cb = functools.partial(waiter.on_delivery, idx)
                if not self._try_produce(env, value, cb):
                    await self._queue_when_room(env, value, cb)
            except ProduceError as exc:
                failed_users.add(env.external_userid)
                waiter.settle(idx, exc, None, None)
            except KafkaException as exc:  # e.g. too large, or a fatal idempotence error
                failed_users.add(env.external_userid)
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is not None and err.fatal():
                    self._fatal_error = err  # the next batch runs on a new instance
                waiter.settle(idx, ProduceError(f"produce failed: {exc}", err), None, None)

    # ------------------------------------------------------------------ lifecycle
    def flush(self, timeout_s: float) -> int:
        """Wait for queued messages; returns how many are still not delivered."""
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush (bounded), stop the poll thread; returns messages left undelivered."""
        if self._closed:
            return 0
        self._closed = True
        remaining = int(self._producer.flush(timeout_s))
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if remaining:
            log.warning("kafka.producer_closed_with_pending", pending=remaining, topic=self.topic)
        return remaining

    def __len__(self) -> int:
        """Messages queued in librdkafka, not yet delivered."""
        return len(self._producer)

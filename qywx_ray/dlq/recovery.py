"""DLQ recovery: consume dead letters, schedule retries durably, re-produce them when due.

Two loops over one plain object (the Ray actor in dlq/actor.py only hosts it):
- consume: a batch of DLQ records → strategy → delay queue or manual review (+ index),
  then, and only then, commit the DLQ offsets. On any failure the batch is re-read.
- schedule: claim due entries (lease) → confirmed produce to the main topic with
  retry headers → ack. A crash between claim and ack re-queues on lease expiry.
It never fires a retry before its due time by the injected clock, and never loses a letter;
duplicates are allowed (consumers deduplicate by message_id).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from qywx_ray.dlq.delay_queue import DelayQueue
from qywx_ray.dlq.index import RETRIED, DLQIndex
from qywx_ray.dlq.message import (
    ActionType,
    DeadLetterMessage,
    KafkaSource,
    make_dead_letter,
)
from qywx_ray.dlq.parking import FLAG_PREFIX
from qywx_ray.dlq.strategies import BlockedUntil, RecoveryStrategy, decide, default_strategies
from qywx_ray.dlq.tokens import drain_token_record
from qywx_ray.envelope import Headers
from qywx_ray.errors import EnvelopeError, InfraError
from qywx_ray.kafka.config import consumer_config, producer_config
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_redis

log = get_logger(__name__)

Clock = Callable[[], float]

RECOVERED = metrics.counter(
    "qywx_dlq_messages_recovered_total", "Dead letters re-produced to the main topic"
)
UNRECOVERABLE = metrics.counter(
    "qywx_dlq_messages_unrecoverable_total", "Dead letters sent to manual review"
)
CONSUMER_LAG = metrics.gauge("qywx_dlq_consumer_lag", "DLQ records not yet consumed")
REVIEW_PENDING = metrics.gauge("qywx_dlq_manual_review_pending", "Letters awaiting manual review")
SCHEDULED = metrics.gauge("qywx_dlq_scheduled", "Retries waiting or in flight in the delay queue")


class RecoveryService:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.time,
        redis_client: redis.Redis | None = None,
        blocked_until: BlockedUntil | None = None,
        strategies: dict[FailureReason, RecoveryStrategy] | None = None,
        node_id: str = "",
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.node_id = node_id
        self.redis = redis_client or make_redis(settings.redis)
        self.queue = DelayQueue(self.redis, settings.dlq.redis_prefix)
        self.index = DLQIndex(self.redis, settings.dlq.redis_prefix)
        self.strategies = strategies or default_strategies(settings.dlq, blocked_until)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._last_gauges = 0.0
        self._last_lag = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._leased: set[str] = set()  # claimed by schedule_once and not acked yet
        self._leased_lock = threading.Lock()
        # Partitions the DLQ consumer owns, kept by its rebalance callbacks (which run in
        # the consume thread): stats and gauges read this instead of calling into the
        # consumer from another thread, which could stall behind a rebalance in progress.
        self._assigned: frozenset[tuple[str, int]] = frozenset()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> RecoveryService:
        if self._consumer is None:
            self._consumer = Consumer(
                consumer_config(self.settings.kafka, self.settings.dlq.recovery_group_id)
            )
            self._consumer.subscribe(
                [self.settings.kafka.dlq_topic.name],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
        if self._producer is None:
            timeout_ms = int(self.settings.dlq.retry_produce_timeout_s * 1000)
            self._producer = Producer(
                producer_config(
                    self.settings.kafka,
                    "main",
                    **{
                        "delivery.timeout.ms": timeout_ms,
                        "request.timeout.ms": min(
                            self.settings.kafka.producer.request_timeout_ms, timeout_ms
                        ),
                    },
                )
            )
        return self

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = self._assigned | {(tp.topic, tp.partition) for tp in partitions}

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = self._assigned - {(tp.topic, tp.partition) for tp in partitions}

    def run_in_background(self) -> None:
        """Start both loops on their own threads (the actor's way to run)."""
        self.start()
        self._stop.clear()
        for name, loop in (
            ("dlq-consume", self._consume_loop),
            ("dlq-schedule", self._schedule_loop),
        ):
            thread = threading.Thread(target=loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout_s: float = 10.0) -> int:
        """Graceful stop (bounded by ~2 x timeout_s): let both loops finish their batch,
        leave the DLQ group (what was consumed and durably scheduled is committed; the rest
        is read again), flush the producer, and put entries this service still holds a
        lease on back in the delay queue, due now, instead of waiting for the lease to
        expire. Returns how many leases were released."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self._threads.clear()
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
            self._assigned = frozenset()
        if self._producer is not None:
            self._producer.flush(timeout_s)
            self._producer = None
        with self._leased_lock:
            leased, self._leased = sorted(self._leased), set()
        released = self.queue.retry_later(leased, self.clock()) if leased else 0
        if leased:
            log.info("dlq.recovery.leases_released", count=released)
        return released

    def _consume_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.consume_once(0.5)
            except Exception as exc:  # noqa: BLE001 - a background loop survives anything; logged, retried in 1 s
                log.error("dlq.recovery.consume_failed", error=str(exc))
                self._stop.wait(1.0)

    def _schedule_loop(self) -> None:
        while not self._stop.is_set():
            try:
                fired = self.schedule_once()
            except Exception as exc:  # noqa: BLE001 - a background loop survives anything; logged, retried
                log.error("dlq.recovery.schedule_failed", error=str(exc))
                fired = 0
            if fired < self.settings.dlq.schedule_batch_max:
                self._stop.wait(self.settings.dlq.scheduler_interval_s)

    # ---- consume: DLQ topic → delay queue --------------------------------------------------
    def consume_once(self, timeout_s: float = 1.0) -> int:
        """One batch. Returns the number of letters durably scheduled or put in review."""
        consumer = self.start()._consumer
        assert consumer is not None
        records = consumer.consume(self.settings.dlq.consume_batch_max, timeout_s)
        good = [m for m in records if m.error() is None]
        for m in records:
            err = m.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                log.warning("dlq.recovery.consume_error", error=str(err))
        if not good:
            self._update_gauges(lag=True)
            return 0
        try:
            count = self._handle(good)
            consumer.commit(
                offsets=[
                    TopicPartition(topic, partition, offset + 1)
                    for (topic, partition), offset in _last_offsets(good).items()
                ],
                asynchronous=False,
            )
        except Exception:
            # Nothing of this batch is committed: read it again (scheduling is idempotent).
            for (topic, partition), offset in _first_offsets(good).items():
                try:
                    consumer.seek(TopicPartition(topic, partition, offset))
                except Exception as exc:  # noqa: BLE001 - best effort before re-raising the original error
                    log.error("dlq.recovery.seek_failed", error=str(exc), partition=partition)
            raise
        self._update_gauges(lag=True)
        return count

    def _handle(self, records: list[Message]) -> int:
        now = self.clock()
        scheduled: list[DeadLetterMessage] = []
        review: list[DeadLetterMessage] = []
        entries: list[tuple[str, float, bytes]] = []
        for record in records:
            letter = self._parse(record, now)
            decision = decide(self.strategies, letter, now)
            if decision.schedule:
                letter = letter.model_copy(update={"next_retry_time": decision.due_s})
                entries.append((letter.entry_id(), decision.due_s, letter.to_bytes()))
                scheduled.append(letter)
            else:
                letter = letter.model_copy(
                    update={
                        "manual_review": True,
                        "suggested_action": ActionType.MANUAL_REVIEW,
                        "next_retry_time": None,
                        "failure_details": f"{letter.failure_details} [review: {decision.why}]",
                    }
                )
                review.append(letter)
        self.index.record(scheduled, review)
        self.queue.schedule_many(entries)
        self._release_parked(review)
        for letter in review:
            UNRECOVERABLE.inc()
            log.warning(
                "dlq.manual_review",
                message_id=letter.message_id,
                user=letter.user_id,
                reason=letter.failure_reason.value,
                retry_count=letter.retry_count,
            )
        return len(records)

    def _parse(self, record: Message, now: float) -> DeadLetterMessage:
        try:
            return DeadLetterMessage.from_bytes(record.value())
        except EnvelopeError as exc:
            topic, partition, offset = record.topic() or "", record.partition(), record.offset()
            key = record.key()
            return make_dead_letter(
                reason=FailureReason.INVALID_MESSAGE,
                failure_time=now,
                settings=self.settings.dlq,
                raw_value=record.value() or b"",
                message_id=f"raw:{topic}:{partition}:{offset}",
                details=f"unreadable dead-letter record: {exc}",
                source=KafkaSource(topic=topic, partition=partition or 0, offset=offset or 0),
                user_id=key.decode(errors="replace") if isinstance(key, bytes) else "",
                node_id=self.node_id,
            )

    # ---- users parked behind a letter that will never be retried ---------------------------
    def _release_parked(self, review: list[DeadLetterMessage]) -> None:
        """A user parked behind a letter now in manual review (or unsendable) would wait
        forever: put a drain token for it on the main topic, confirmed, before the DLQ
        offset is committed. The user's host then drains the lot in order, exactly as
        after a successful retry; this actor never touches the lot itself (it used to
        peek/produce/trim, which raced with a host re-parking the user: lost and
        reordered messages; tests/integration/test_dlq_recovery.py)."""
        if not review:
            return
        pipe = self.redis.pipeline(transaction=False)
        for letter in review:
            pipe.get(FLAG_PREFIX + letter.user_id)
        waiting = pipe.execute()
        tokens = [
            drain_token_record(letter.user_id, letter.message_id, letter.open_kfid)
            for letter, flag in zip(review, waiting, strict=True)
            if flag is not None and flag.decode() == letter.message_id
        ]
        if not tokens:
            return
        self._produce_confirmed(tokens)
        for key, _value, headers in tokens:
            log.warning(
                "dlq.parked_released",
                user=key.decode(),
                blocked_by=dict(headers)["msg_id"].decode(),
            )

    def _produce_confirmed(self, records: list[tuple[bytes, bytes, Headers]]) -> None:
        producer = self.start()._producer
        assert producer is not None
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, _m: Message) -> None:
            if err is not None:
                errors.append(str(err))

        for key, value, headers in records:
            producer.produce(
                self.settings.kafka.main_topic.name,
                key=key,
                value=value,
                headers=list(headers),
                on_delivery=on_delivery,
            )
        remaining = producer.flush(self.settings.dlq.retry_produce_timeout_s + 1.0)
        if errors or remaining:
            raise InfraError(
                f"main topic refused {len(errors) + remaining} released parked message(s): "
                f"{errors[:1]}"
            )

    # ---- schedule: delay queue → main topic ------------------------------------------------
    def _produce_retry(
        self,
        producer: Producer,
        entry_id: str,
        letter: DeadLetterMessage,
        results: dict[str, str | None],
    ) -> DeadLetterMessage | None:
        """Queue one retry on the main topic; its delivery report lands in `results`. A
        record the producer refuses outright (e.g. too large: retrying cannot help) is
        returned as the letter to send to manual review instead."""
        strategy = self.strategies[letter.failure_reason]

        def on_delivery(err: KafkaError | None, _m: Message) -> None:
            results[entry_id] = None if err is None else str(err)

        try:
            record = strategy.prepare(letter)
            results[entry_id] = "not delivered"
            producer.produce(
                self.settings.kafka.main_topic.name,
                key=record.key,
                value=record.value,
                headers=list(record.headers),
                on_delivery=on_delivery,
            )
        except (KafkaException, ValueError) as exc:
            results.pop(entry_id, None)
            return letter.model_copy(
                update={
                    "manual_review": True,
                    "suggested_action": ActionType.MANUAL_REVIEW,
                    "failure_details": f"{letter.failure_details} [unsendable: {exc}]",
                }
            )
        return None

    def schedule_once(self) -> int:
        """Re-produce every due entry (one batch). Returns the number acknowledged."""
        producer = self.start()._producer
        assert producer is not None
        now = self.clock()
        claimed = self.queue.claim_due(
            now, self.settings.dlq.lease_s, self.settings.dlq.schedule_batch_max
        )
        if not claimed:
            self._update_gauges()
            return 0
        with self._leased_lock:
            self._leased.update(e.entry_id for e in claimed)
        results: dict[str, str | None] = {}
        letters: dict[str, DeadLetterMessage] = {}
        unsendable: list[DeadLetterMessage] = []
        for entry in claimed:
            try:
                letter = DeadLetterMessage.from_bytes(entry.payload)
            except EnvelopeError as exc:  # cannot happen unless Redis was edited by hand
                log.error("dlq.recovery.bad_entry", entry_id=entry.entry_id, error=str(exc))
                self.redis.hset(self.index.review, entry.entry_id, entry.payload)
                self.queue.ack_many([entry.entry_id])
                continue
            letters[entry.entry_id] = letter
            refused = self._produce_retry(producer, entry.entry_id, letter, results)
            if refused is not None:
                unsendable.append(refused)
        if unsendable:
            self.index.record([], unsendable)
            self._release_parked(unsendable)  # before the ack: a crash re-claims them
            self.queue.ack_many([lt.entry_id() for lt in unsendable])
            UNRECOVERABLE.inc(len(unsendable))
            log.error("dlq.retry_unsendable", message_ids=[lt.message_id for lt in unsendable])
        producer.flush(self.settings.dlq.retry_produce_timeout_s + 1.0)
        acked = [eid for eid, err in results.items() if err is None]
        failed = {eid: err for eid, err in results.items() if err is not None}
        self.queue.ack_many(acked)
        with self._leased_lock:
            self._leased.difference_update([*acked, *(lt.entry_id() for lt in unsendable)])
        self.index.mark([letters[eid].message_id for eid in acked], RETRIED)
        for eid in acked:
            self.strategies[letters[eid].failure_reason].on_success(letters[eid])
        for eid, err in failed.items():
            self.strategies[letters[eid].failure_reason].on_failure(letters[eid], err or "")
        if acked:
            RECOVERED.inc(len(acked))
            log.info("dlq.retried", count=len(acked))
        if failed:
            # Left leased: they come back when the lease expires (the main topic is sick).
            log.error(
                "dlq.retry_produce_failed", count=len(failed), error=next(iter(failed.values()))
            )
        self._update_gauges(force=True)
        return len(acked)

    # ---- gauges ------------------------------------------------------------------------------
    def _update_gauges(self, force: bool = False, lag: bool = False) -> None:
        """Refresh the gauges (every 5 s unless forced). Only the consume thread asks for
        the lag: it is the thread that may call into the DLQ consumer."""
        now = time.monotonic()
        try:
            if lag and now - self._last_lag >= 5.0:
                self._last_lag = now
                CONSUMER_LAG.set(self.consumer_lag())
            if not force and now - self._last_gauges < 5.0:
                return
            self._last_gauges = now
            waiting, inflight = self.queue.counts()
            SCHEDULED.set(waiting + inflight)
            REVIEW_PENDING.set(self.index.review_count())
        except Exception as exc:  # noqa: BLE001 - gauges only; never fail the loop that updates them
            log.warning("dlq.recovery.gauges_failed", error=str(exc))

    def consumer_lag(self) -> int:
        consumer = self._consumer
        if consumer is None:
            return 0
        lag = 0
        for topic, partition in sorted(self._assigned):
            tp = TopicPartition(topic, partition)
            low, high = consumer.get_watermark_offsets(tp, timeout=1.0)
            committed = consumer.committed([tp], timeout=1.0)[0].offset
            lag += max(0, high - (committed if committed >= 0 else low))
        return lag

    def stats(self) -> dict[str, Any]:
        waiting, inflight = self.queue.counts()
        return {
            "scheduled_waiting": waiting,
            "scheduled_inflight": inflight,
            "manual_review_pending": self.index.review_count(),
            "recovered_total": RECOVERED.total(),
            # 0 until the recovery consumer has joined its group: letters wait meanwhile.
            "assigned_partitions": len(self._assigned),
        }


def _last_offsets(records: list[Message]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for m in records:
        key = (m.topic() or "", m.partition() or 0)
        out[key] = max(out.get(key, -1), m.offset() or 0)
    return out


def _first_offsets(records: list[Message]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for m in records:
        key = (m.topic() or "", m.partition() or 0)
        offset = m.offset() or 0
        out[key] = min(out.get(key, offset), offset)
    return out

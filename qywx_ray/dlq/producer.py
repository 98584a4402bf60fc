"""The dead-letter producer: returns only when every letter is durably written.

Durable = acknowledged by the DLQ topic (acks=all, idempotent, one in flight), or, when the
topic cannot take it (error, timeout, this producer's own breaker open), appended and
fsync'd to the emergency file. It never returns normally with a letter in neither place:
if both fail it raises InfraError and the caller must not count the offset as processed.
Delivery reports are served by one dedicated poll thread; `send_many` blocks on the
producer's own small pool (`dlq.send_threads`), never on the loop's default executor: a
host's hung handler threads must not be able to stop its dead letters. The owner of a
producer also empties the emergency file in the background once the topic takes writes
again (`EmergencyReplayer`, `dlq.emergency_replay_interval_s`): until then the letters
there keep their users parked.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from qywx_ray.breaker import Breaker
from qywx_ray.dlq import emergency
from qywx_ray.dlq.emergency import EmergencyReplayer, ReplayReport
from qywx_ray.dlq.message import DeadLetterMessage
from qywx_ray.errors import InfraError
from qywx_ray.kafka.config import producer_config
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger
from qywx_ray.settings import Settings

log = get_logger(__name__)

Clock = Callable[[], float]

PRODUCED = metrics.counter(
    "qywx_dlq_messages_produced_total", "Dead letters acknowledged by the DLQ topic", ["reason"]
)
EMERGENCY_WRITES = metrics.counter(
    "qywx_dlq_emergency_writes_total", "Dead letters written to the local emergency file"
)


@dataclass
class _Batch:
    pending: int
    acked: list[bool]
    errors: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, index: int) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            with self.lock:
                if err is None:
                    self.acked[index] = True
                else:
                    self.errors[index] = str(err)
                self.pending -= 1
                if self.pending <= 0:
                    self.done.set()

        return on_delivery


class DLQProducer:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = time.time,
        emergency_dir: Path | None = None,
        replay_in_background: bool | None = None,
    ) -> None:
        """`replay_in_background`: None = when `dlq.emergency_replay_interval_s` > 0."""
        self.settings = settings
        self.topic = settings.kafka.dlq_topic.name
        self.timeout_s = settings.dlq.produce_timeout_s
        self.emergency_dir = emergency_dir or settings.dlq_emergency_dir
        self._clock = clock
        # No limit on half-open trials: callers are serialised by _send_lock and each
        # outcome is reported at once, so the first one decides.
        self.breaker = Breaker(
            failure_threshold=settings.dlq.breaker_failure_threshold,
            cooldown_s=settings.dlq.breaker_open_s,
            half_open_trials=None,
        )
        timeout_ms = int(self.timeout_s * 1000)
        self._conf = producer_config(
            settings.kafka,
            "dlq",
            **{
                "delivery.timeout.ms": timeout_ms,
                "request.timeout.ms": min(settings.kafka.producer.request_timeout_ms, timeout_ms),
                "socket.connection.setup.timeout.ms": max(1000, min(timeout_ms, 30_000)),
                "error_cb": self._on_error,
            },
        )
        self._producer = Producer(self._conf)
        self._fatal = False
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll_loop, name="dlq-producer-poll", daemon=True
        )
        self._poller.start()
        self._executor = ThreadPoolExecutor(
            max_workers=settings.dlq.send_threads, thread_name_prefix="dlq-send"
        )
        interval_s = settings.dlq.emergency_replay_interval_s
        if replay_in_background is None:
            replay_in_background = interval_s > 0
        self.replayer: EmergencyReplayer | None = None
        if replay_in_background:
            self.replayer = EmergencyReplayer(
                self.emergency_dir,
                self.replay_publish,
                interval_s=interval_s or 5.0,
                backoff_max_s=settings.dlq.emergency_replay_backoff_max_s,
                can_try=self.breaker_allows,
            ).start()

    # ---- plumbing ------------------------------------------------------------------------
    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = True
        log.warning("dlq.producer.kafka_error", error=str(err), fatal=err.fatal())

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.1)
            except Exception as exc:  # noqa: BLE001 - never let the delivery thread die silently
                log.error("dlq.producer.poll_failed", error=str(exc))
                time.sleep(0.1)

    def _renew_if_fatal(self) -> None:
        if self._fatal:
            log.error("dlq.producer.recreated_after_fatal_error")
            self._producer = Producer(self._conf)
            self._fatal = False

    # ---- the Kafka attempt -----------------------------------------------------------------
    def publish(self, letters: Sequence[DeadLetterMessage]) -> list[bool]:
        """Produce to the DLQ topic and wait (bounded); per letter: acknowledged or not."""
        if not letters:
            return []
        self._renew_if_fatal()
        batch = _Batch(
            pending=len(letters), acked=[False] * len(letters), errors=[""] * len(letters)
        )
        deadline = time.monotonic() + self.timeout_s
        submitted = 0
        for index, letter in enumerate(letters):
            if self._submit(letter, batch, index, deadline):
                submitted += 1
            elif time.monotonic() >= deadline:
                break
        with batch.lock:
            batch.pending -= len(letters) - submitted
            if batch.pending <= 0:
                batch.done.set()
        batch.done.wait(max(0.0, deadline - time.monotonic()) + 1.0)
        with batch.lock:
            acked = list(batch.acked)
        for letter, ok in zip(letters, acked, strict=True):
            if ok:
                PRODUCED.inc(reason=letter.failure_reason.value)
        return acked

    def _submit(
        self, letter: DeadLetterMessage, batch: _Batch, index: int, deadline: float
    ) -> bool:
        """Hand one letter to librdkafka: True once queued; False on a refusal (recorded in
        the batch) or when the local queue stayed full until `deadline`."""
        while True:
            try:
                self._producer.produce(
                    self.topic,
                    key=letter.user_id.encode(),
                    value=letter.to_bytes(),
                    headers=list(letter.kafka_headers()),
                    on_delivery=batch.callback(index),
                )
                return True
            except BufferError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)  # the poll thread drains the local queue
            except KafkaException as exc:
                batch.errors[index] = str(exc)
                return False

    def breaker_allows(self) -> bool:
        with self._send_lock:
            return self.breaker.allow()

    def replay_publish(self, letters: Sequence[DeadLetterMessage]) -> list[bool]:
        """`publish` for the emergency replay: its outcome also drives the breaker, so a
        replay that gets through (the half-open probe) sends new letters to the topic again."""
        acked = self.publish(letters)
        with self._send_lock:
            if any(acked):
                self.breaker.on_success()
            else:
                self.breaker.on_failure()
        return acked

    # ---- the contract --------------------------------------------------------------------
    def send_many_sync(self, letters: Sequence[DeadLetterMessage]) -> None:
        """Return only when every letter is on the DLQ topic or in the fsync'd emergency file."""
        if not letters:
            return
        # Concurrent callers share librdkafka's batches; only the breaker is serialized.
        with self._send_lock:
            allowed = self.breaker.allow()
        acked: list[bool] = self.publish(letters) if allowed else [False] * len(letters)
        if allowed:
            with self._send_lock:
                # The topic is sick only if it took nothing; one oversized letter is not.
                if any(acked):
                    self.breaker.on_success()
                else:
                    self.breaker.on_failure()
        rest = [letter for letter, ok in zip(letters, acked, strict=True) if not ok]
        if any(acked):
            log.warning(
                "dlq.produced",
                count=sum(acked),
                reasons=sorted({lt.failure_reason.value for lt in letters}),
            )
        if rest:
            self._write_emergency(rest)

    async def send_many(self, letters: list[DeadLetterMessage]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.send_many_sync, letters)

    def _write_emergency(self, letters: Sequence[DeadLetterMessage]) -> None:
        try:
            path = emergency.write_letters(self.emergency_dir, letters, self._clock())
        except OSError as exc:
            log.error(
                "dlq.emergency.write_failed",
                error=str(exc),
                message_ids=[lt.message_id for lt in letters][:50],
            )
            raise InfraError(
                f"dead letters could not be written to the DLQ topic nor to "
                f"{self.emergency_dir}: {exc}"
            ) from exc
        EMERGENCY_WRITES.inc(len(letters))
        log.error(
            "dlq.emergency.written",
            file=str(path),
            count=len(letters),
            breaker=self.breaker.state,
            message_ids=[lt.message_id for lt in letters][:50],
        )

    def close(self, timeout_s: float = 5.0) -> None:
        if self.replayer is not None:  # a round in progress ends within produce_timeout_s
            self.replayer.stop(timeout_s=0)
        try:
            self._producer.flush(timeout_s)
        finally:
            self._stop.set()
            self._poller.join(timeout=2.0)
            self._executor.shutdown(wait=False)

    def __enter__(self) -> DLQProducer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def replay_emergency(settings: Settings, *, batch_size: int = 500) -> ReplayReport:
    """Re-publish emergency-file entries to the DLQ topic, each exactly once across runs
    (by hand; producers' owners also do it in the background). Waits for a background
    replay running on this node, then finds its entries done."""
    producer = DLQProducer(settings, replay_in_background=False)
    try:
        report = emergency.replay(settings.dlq_emergency_dir, producer.publish, batch_size)
    finally:
        producer.close()
    log.warning(
        "dlq.emergency.replayed",
        published=report.published,
        already_done=report.already_done,
        failed=report.failed,
        unreadable=report.unreadable,
    )
    return report

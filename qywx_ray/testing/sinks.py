"""A test dead-letter sink: JSON records on the DLQ topic (consume.dead_letter_sink =
"qywx_ray.testing.sinks:json_sink").

It writes a format the recovery actor can NOT read, so it is never a default. It returns
only when Kafka acknowledged every record, from its own thread: never the loop's default
executor, which hung work elsewhere in the process could fill.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qywx_ray.consume.types import DeadLetter
from qywx_ray.errors import InfraError
from qywx_ray.kafka.config import producer_config
from qywx_ray.settings import Settings


class KafkaDeadLetterSink:
    def __init__(self, settings: Settings, flush_timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        self._topic = settings.kafka.dlq_topic.name
        self._producer = Producer(producer_config(settings.kafka, "dlq"))
        self._timeout_s = flush_timeout_s
        self._lock = threading.Lock()
        # Sends are serialized by the lock anyway: one thread, owned by this sink.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="json-dlq-send")

    def _send_blocking(self, letters: Sequence[DeadLetter]) -> None:
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        with self._lock:
            for letter in letters:
                self._producer.produce(
                    self._topic,
                    key=letter.user.encode(),
                    value=letter.to_json(),
                    headers=[
                        ("reason", letter.reason.encode()),
                        ("msg_id", letter.message_id.encode()),
                    ],
                    on_delivery=on_delivery,
                )
            left = self._producer.flush(self._timeout_s)
        if left:
            raise InfraError(f"{left} dead letters not acknowledged within {self._timeout_s}s")
        if errors:
            raise InfraError(f"dead letter delivery failed: {errors[0]}")

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._send_blocking, letters)


def json_sink(settings: Settings) -> KafkaDeadLetterSink:
    """Test fake: consume.dead_letter_sink = "qywx_ray.testing.sinks:json_sink"."""
    return KafkaDeadLetterSink(settings)

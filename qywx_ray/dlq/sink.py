"""Adapter from the consume path's DeadLetterSink seam to the DLQ producer.

Wire it with `consume.dead_letter_sink = "qywx_ray.dlq.sink:make_sink"`. It converts the
host's consume.types.DeadLetter into a DeadLetterMessage (the original design's format, policy) and
resolves only when every letter is durable (DLQ topic ack or fsync'd emergency file);
it raises otherwise, so the host never counts an offset whose letter is not durable.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence

from qywx_ray.consume.types import DeadLetter
from qywx_ray.dlq.message import DeadLetterMessage, KafkaSource, make_dead_letter
from qywx_ray.dlq.producer import DLQProducer
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.envelope import Envelope
from qywx_ray.errors import EnvelopeError
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings


def to_dead_letter_message(
    letter: DeadLetter,
    settings: DLQSettings,
    now_s: float,
    *,
    node_id: str = "",
    user_group: str = "normal",
) -> DeadLetterMessage:
    """`letter.attempt` is 1 + the retry_count header of the failed record (1 = first try)."""
    reason = FailureReason.parse(letter.reason)
    details = letter.error if reason.value == letter.reason else f"[{letter.reason}] {letter.error}"
    envelope: Envelope | None
    try:
        envelope = Envelope.from_bytes(letter.value)
    except EnvelopeError:
        envelope = None
    return make_dead_letter(
        reason=reason,
        failure_time=now_s,
        settings=settings,
        envelope=envelope,
        raw_value=None if envelope is not None else letter.value,
        message_id=letter.message_id,
        details=details,
        source=KafkaSource(
            topic=letter.topic,
            partition=letter.partition,
            offset=letter.offset,
            timestamp=letter.timestamp_ms / 1000,
        ),
        retry_count=max(0, letter.attempt - 1),
        user_id=letter.user,
        user_group=user_group,
        processor_id=f"{letter.topic}:{letter.partition}",
        node_id=node_id,
    )


class DLQSink:
    def __init__(
        self,
        settings: Settings,
        *,
        producer: DLQProducer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.producer = producer or DLQProducer(settings, clock=clock)
        self.clock = clock
        self.node_id = socket.gethostname()

    def convert(self, letters: Sequence[DeadLetter]) -> list[DeadLetterMessage]:
        now = self.clock()
        return [
            to_dead_letter_message(lt, self.settings.dlq, now, node_id=self.node_id)
            for lt in letters
        ]

    async def dead_letter(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            await self.producer.send_many(self.convert(letters))

    def close(self) -> None:
        self.producer.close()


def make_sink(settings: Settings) -> DLQSink:
    return DLQSink(settings)

"""Dead letters for tests (topics and reading them back: `tests.helpers.kafka`).

Tests import from here, never from another test module.
"""

from __future__ import annotations

import time

from qywx_ray.dlq.message import DeadLetterMessage, FailureReason, KafkaSource, make_dead_letter
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.envelope import Envelope


def letters_for(n: int, prefix: str = "m") -> list[DeadLetterMessage]:
    return [
        make_dead_letter(
            reason=FailureReason.DOWNSTREAM_ERROR if i % 2 else FailureReason.QUEUE_FULL,
            failure_time=time.time(),
            settings=DLQSettings(),
            envelope=Envelope(
                message_id=f"{prefix}{i}",
                open_kfid="kf",
                external_userid=f"u{i % 7}",
                msgtype="text",
                raw={"i": i},
            ),
            source=KafkaSource(topic="main", partition=i % 4, offset=i),
            details="handler error",
        )
        for i in range(n)
    ]

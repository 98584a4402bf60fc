"""Drain tokens: the one way a parked user is released (see docs/guarantees.md).

A token is a tiny record on the MAIN topic, keyed by the user (so it lands on the
user's partition and host like any of its messages), with headers `msg_id` = the
blocker's message id, `retry_from_dlq` and `qywx_drain`. A host treats it as "the user's
blocker is settled: drain the lot behind it" and never runs the handler for it. Two
writers, one drain owner (the host):
- a draining host puts a new token on the topic before each chunk and then completes
  what it held so far, so a drain never pins its partition's commit for longer than one
  chunk, and a crash mid-drain leaves the newest token uncommitted: the drain resumes;
- the DLQ recovery, when a blocker goes to manual review (or cannot be re-sent), so its
  user does not wait forever. It no longer touches the lot itself.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qywx_ray.consume.types import DRAIN_HEADER
from qywx_ray.envelope import Envelope, Headers
from qywx_ray.errors import InfraError
from qywx_ray.kafka.config import producer_config
from qywx_ray.settings import Settings

TOKEN_MSGTYPE = "qywx_drain"


def drain_token_record(user: str, message_id: str, open_kfid: str) -> tuple[bytes, bytes, Headers]:
    """(key, value, headers) of the token that releases `user` from `message_id`."""
    value = Envelope(
        message_id=message_id,
        open_kfid=open_kfid,
        external_userid=user,
        msgtype=TOKEN_MSGTYPE,
        ingest_ts_ms=0,
    ).to_bytes()
    headers: Headers = [
        ("msg_id", message_id.encode()),
        ("retry_from_dlq", b"true"),
        ("retry_count", b"0"),
        (DRAIN_HEADER, b"1"),
    ]
    return user.encode(), value, headers


class KafkaDrainTokens:
    """consume.types.DrainTokenSink on the main topic: resolves once Kafka acknowledged.

    Its own producer and its own thread: a token never waits behind dead-letter writes or
    handler threads (a drain holds its user's place meanwhile).

    The producer is created at the first token, on that thread: drains are rare, and
    every host and dedicated user actor holds one of these, so an eager producer (its
    own librdkafka threads, broker connections and ~1.5 MiB) in each process is pure cost
    (bench/bench_actor_start.py). A bad Kafka config then surfaces at the first drain."""

    def __init__(self, settings: Settings, timeout_s: float = 30.0) -> None:
        self._topic = settings.kafka.main_topic.name
        self._config = producer_config(settings.kafka, "main")
        self._producer: Any = None
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="drain-tokens")

    def _send_blocking(self, user: str, message_id: str, open_kfid: str) -> None:
        key, value, headers = drain_token_record(user, message_id, open_kfid)
        errors: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        with self._lock:
            if self._producer is None:
                from confluent_kafka import Producer

                self._producer = Producer(self._config)
            self._producer.produce(
                self._topic, key=key, value=value, headers=list(headers), on_delivery=on_delivery
            )
            left = self._producer.flush(self._timeout_s)
        if left or errors:
            raise InfraError(f"drain token for {user} not acknowledged: {errors[:1] or left}")

    async def drain_token(self, user: str, message_id: str, open_kfid: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._send_blocking, user, message_id, open_kfid)


def make_drain_tokens(settings: Settings) -> KafkaDrainTokens | None:
    """The hosts' token sink; None when per-user retry order (parking) is off."""
    return KafkaDrainTokens(settings) if settings.consume.retry_order else None

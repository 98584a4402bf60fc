"""Helpers shared by the ingest tests (no tests here).

The main topic created and read back in the ingest tests' shape (over
`tests.helpers.kafka`), a fake kf/sync_msg page source, WeCom-shaped messages, and
clients pointed at closed ports to simulate outages without touching the shared services.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from qywx_ray.devstack.procs import free_port
from qywx_ray.envelope import Envelope
from qywx_ray.ingest.producer import (
    BatchResult,
    Delivery,
    HeldBehind,
    KafkaIngestProducer,
    ProduceError,
)
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from tests.helpers.kafka import create_topics, envelope_of, position_of, read_records


def create_topic(settings: Settings, partitions: int = 4, timeout_s: float = 30.0) -> str:
    """The main topic with `partitions` partitions, visible in the broker's metadata."""
    topic = settings.kafka.main_topic.name
    create_topics(settings, (topic, partitions), timeout_s=timeout_s)
    return topic


def read_topic(
    settings: Settings, expected: int, timeout_s: float = 30.0, grace_s: float = 1.0
) -> list[tuple[int, int, Envelope]]:
    """The main topic as (partition, offset, envelope): `read_records` until `expected`
    records, then until quiet for `grace_s`."""
    records = read_records(settings, settings.kafka.main_topic.name, expected, timeout_s, grace_s)
    return [(*position_of(r), envelope_of(r)) for r in records]


def per_user_order(records: list[tuple[int, int, Envelope]]) -> dict[str, list[str]]:
    """message_ids per user in log order (a user lives in one partition: offset order)."""
    by_user: dict[str, list[tuple[int, int, str]]] = {}
    for partition, offset, env in records:
        by_user.setdefault(env.external_userid, []).append((partition, offset, env.message_id))
    out = {}
    for user, rows in by_user.items():
        assert len({p for p, _, _ in rows}) == 1, f"user {user} spread over partitions"
        out[user] = [mid for _, _, mid in sorted(rows)]
    return out


def first_occurrences(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for mid in ids:
        if mid not in seen:
            seen.add(mid)
            out.append(mid)
    return out


def wecom_msg(msgid: str, user: str, kfid: str = "wkKF1", text: str = "hi") -> dict[str, Any]:
    return {
        "msgid": msgid,
        "open_kfid": kfid,
        "external_userid": user,
        "send_time": 1_700_000_000,
        "origin": 3,
        "msgtype": "text",
        "text": {"content": text},
    }


def make_pages(
    n_pages: int, per_page: int, users: int, kfid: str = "wkKF1", tag: str = "m"
) -> list[list[dict[str, Any]]]:
    pages = []
    seq = 0
    for _ in range(n_pages):
        page = []
        for _ in range(per_page):
            page.append(wecom_msg(f"{tag}{seq:05d}", f"u{seq % users:03d}", kfid))
            seq += 1
        pages.append(page)
    return pages


@dataclass
class FakePage:
    errcode: int = 0
    errmsg: str = "ok"
    next_cursor: str = ""
    has_more: bool = False
    msg_list: list[dict[str, Any]] = field(default_factory=list)


class FakeSource:
    """kf/sync_msg over a growing list of pages; the cursor is the index of the next page."""

    def __init__(self, pages: list[list[dict[str, Any]]] | None = None) -> None:
        self.pages: list[list[dict[str, Any]]] = list(pages or [])
        self.calls: list[tuple[str, str, str, int]] = []
        self.errors: list[int] = []  # errcodes to answer first, one per call

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
        self.calls.append((open_kfid, cursor, token, limit))
        if self.errors:
            return FakePage(errcode=self.errors.pop(0), errmsg="simulated")
        i = int(cursor or 0)
        if i >= len(self.pages):
            return FakePage(next_cursor=cursor, has_more=False)
        return FakePage(
            next_cursor=str(i + 1), has_more=i + 1 < len(self.pages), msg_list=self.pages[i]
        )


def dead_redis() -> aioredis.Redis:
    """An asyncio client pointed at a closed port (an unreachable Redis)."""
    return make_async_redis(
        RedisSettings(
            url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.5, retry_budget_s=0
        )
    )


def dead_producer(settings: Settings, timeout_ms: int = 1500) -> KafkaIngestProducer:
    """A producer whose broker is a closed port: every delivery fails after timeout_ms."""
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    return KafkaIngestProducer(
        kafka,
        topic=settings.kafka.main_topic.name,
        delivery_wait_timeout_s=10.0,
        **{"delivery.timeout.ms": timeout_ms, "request.timeout.ms": min(timeout_ms, 1000)},
    )


def good_producer(settings: Settings, **extra: Any) -> KafkaIngestProducer:
    return KafkaIngestProducer(
        settings.kafka,
        delivery_wait_timeout_s=settings.ingest.delivery_wait_timeout_s,
        produce_block_timeout_s=settings.ingest.produce_block_timeout_s,
        **extra,
    )


class FakeProducer:
    """Acks everything except the message_ids in `failing` (and, like the real producer,
    the later records of a user whose record failed); records what it acked.

    `hook` runs once, inside the first produce_batch, after Kafka "acked" and before the
    caller sees the result: the window in which a paused replayer loses its lease."""

    def __init__(self, failing: set[str] | None = None) -> None:
        self.failing = failing or set()
        self.acked: list[str] = []
        self.batches: list[list[str]] = []
        self.hook: Callable[[], Awaitable[None]] | None = None

    async def produce_batch(self, envelopes: Sequence[Envelope]) -> BatchResult:
        self.batches.append([e.message_id for e in envelopes])
        deliveries = []
        failed_users: set[str] = set()
        for e in envelopes:
            if e.external_userid in failed_users:  # as KafkaIngestProducer holds them
                deliveries.append(Delivery(e, HeldBehind("held behind a failed record")))
            elif e.message_id in self.failing:
                failed_users.add(e.external_userid)
                deliveries.append(Delivery(e, ProduceError("simulated failure")))
            else:
                deliveries.append(Delivery(e))
                self.acked.append(e.message_id)
        if self.hook is not None:
            hook, self.hook = self.hook, None
            await hook()
        return BatchResult(deliveries)

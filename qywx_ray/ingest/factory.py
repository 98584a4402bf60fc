"""The one place that assembles the ingest parts from Settings (for the Ray shells and CLI).

One process (e.g. one syncer host actor) holds one IngestParts: one producer (one poll
thread), one asyncio Redis client, one breaker shared by its syncers and its replayer.
Must never: build a Kafka config or Redis client itself (kafka.config / store.client do).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from qywx_ray.ingest.breaker import ProducerBreaker
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.locks import LockManager
from qywx_ray.ingest.producer import KafkaIngestProducer
from qywx_ray.ingest.spool import Spool, SpoolReplayer
from qywx_ray.ingest.syncer import KfSyncer, SyncSource
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis


@dataclass
class IngestParts:
    settings: Settings
    redis: aioredis.Redis
    producer: KafkaIngestProducer
    locks: LockManager
    cursors: CursorStore
    spool: Spool
    breaker: ProducerBreaker

    def syncer(self, open_kfid: str, source: SyncSource) -> KfSyncer:
        return KfSyncer(
            open_kfid,
            source=source,
            producer=self.producer,
            locks=self.locks,
            cursors=self.cursors,
            spool=self.spool,
            breaker=self.breaker,
            settings=self.settings.ingest,
        )

    def replayer(self) -> SpoolReplayer:
        s = self.settings.ingest
        return SpoolReplayer(
            self.spool,
            self.producer,
            self.locks,
            breaker=self.breaker,
            max_per_user=s.spool_replay_max_per_user,
            max_batch=s.spool_replay_max_batch,
        )

    async def aclose(self, timeout_s: float = 10.0) -> int:
        """Flush and stop the producer, close Redis; returns messages left undelivered."""
        remaining = self.producer.close(timeout_s)
        await self.redis.aclose()
        return remaining


def build_ingest(settings: Settings) -> IngestParts:
    s = settings.ingest
    redis = make_async_redis(settings.redis)
    prefix = s.key_prefix
    return IngestParts(
        settings=settings,
        redis=redis,
        producer=KafkaIngestProducer(
            settings.kafka,
            delivery_wait_timeout_s=s.delivery_wait_timeout_s,
            produce_block_timeout_s=s.produce_block_timeout_s,
        ),
        locks=LockManager(
            redis,
            ttl_s=s.lock_ttl_s,
            extend_every_s=s.lock_extend_every_s,
            prefix=f"{prefix}:lock:",
        ),
        cursors=CursorStore(redis, prefix=f"{prefix}:cursor:"),
        spool=Spool(redis, prefix=prefix),
        breaker=ProducerBreaker(
            failure_threshold=s.breaker_failure_threshold, cooldown_s=s.breaker_cooldown_s
        ),
    )

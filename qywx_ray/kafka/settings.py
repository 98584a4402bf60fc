"""Kafka settings: the dev/prod topic tables are data here, not literals in code."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


class TopicSettings(BaseModel):
    name: str
    partitions: int = Field(ge=1)
    replication_factor: int = Field(ge=1)
    min_insync_replicas: int = Field(ge=1)
    retention_ms: int = 604_800_000  # 7 days
    compression_type: str = "lz4"
    max_message_bytes: int = 1_048_576  # 1 MiB

    @model_validator(mode="after")
    def _isr_fits_rf(self) -> TopicSettings:
        if self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"topic {self.name}: min_insync_replicas={self.min_insync_replicas} is greater "
                f"than replication_factor={self.replication_factor}; no write could ever succeed"
            )
        return self

    def topic_configs(self) -> dict[str, str]:
        """The broker-side topic configs we create and validate."""
        return {
            "min.insync.replicas": str(self.min_insync_replicas),
            "retention.ms": str(self.retention_ms),
            "compression.type": self.compression_type,
            "max.message.bytes": str(self.max_message_bytes),
        }


class ProducerSettings(BaseModel):
    linger_ms: int = 10
    batch_size: int = 262_144
    queue_buffering_max_messages: int = 200_000
    queue_buffering_max_kbytes: int = 262_144
    request_timeout_ms: int = 30_000
    delivery_timeout_ms: int = 120_000
    retry_backoff_ms: int = 100


class ConsumerSettings(BaseModel):
    group_id: str = "qywx-schedule"
    session_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    # 1: a record at a quiet broker is fetched at once (1 KiB held it up to
    # fetch_wait_max_ms: cold-start and low-rate latency); busy partitions batch anyway.
    fetch_min_bytes: int = 1
    fetch_wait_max_ms: int = 100
    poll_batch_max: int = 1_000
    poll_timeout_s: float = 0.05
    # How soon a consumer sees a subscribed topic that appeared late or grew partitions
    # (librdkafka's default is 5 minutes); one small metadata request per interval.
    metadata_refresh_interval_ms: int = Field(default=30_000, ge=1_000, le=300_000)


class KafkaSettings(BaseModel):
    environment: str = "development"
    bootstrap_servers: str = "127.0.0.1:9092"
    main_topic: TopicSettings = TopicSettings(
        name="qywx-chat-messages", partitions=4, replication_factor=1, min_insync_replicas=1
    )
    dlq_topic: TopicSettings = TopicSettings(
        name="qywx-dead-letter-queue", partitions=2, replication_factor=1, min_insync_replicas=1
    )
    producer: ProducerSettings = ProducerSettings()
    consumer: ConsumerSettings = ConsumerSettings()

"""`qywx-ray topics ensure` against a real broker: create, re-run, and every bad config."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from qywx_ray.errors import ConfigError, TopicConfigError
from qywx_ray.kafka.topics import ensure_topics
from qywx_ray.settings import Settings

pytestmark = pytest.mark.integration


def _topics(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def test_creates_both_topics_with_profile_configs(make_settings: Callable[..., Settings]) -> None:
    s = make_settings()
    reports = ensure_topics(s.kafka)
    assert {(r.name, r.action) for r in reports} == {
        (s.kafka.main_topic.name, "created"),
        (s.kafka.dlq_topic.name, "created"),
    }
    # Re-running is idempotent and reads the real configs back from the broker.
    again = {r.name: r for r in ensure_topics(s.kafka)}
    main = again[s.kafka.main_topic.name]
    assert main.action == "ok"
    assert main.partitions == 4
    assert main.replication_factor == 1
    assert main.configs == {
        "min.insync.replicas": "1",
        "retention.ms": "604800000",
        "compression.type": "lz4",
        "max.message.bytes": "1048576",
    }
    assert again[s.kafka.dlq_topic.name].partitions == 2


def test_replication_factor_above_brokers_creates_nothing(
    make_settings: Callable[..., Settings], kafka_bootstrap: str
) -> None:
    s = make_settings(kafka={"main_topic": {"replication_factor": 3, "min_insync_replicas": 2}})
    with pytest.raises(TopicConfigError, match=r"replication_factor=3 but only 1 broker"):
        ensure_topics(s.kafka)
    existing = _topics(kafka_bootstrap)
    assert s.kafka.main_topic.name not in existing
    assert s.kafka.dlq_topic.name not in existing  # the valid DLQ was not half-created


def test_min_isr_above_rf_is_rejected_by_settings(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="min_insync_replicas=2 is greater than"):
        make_settings(kafka={"dlq_topic": {"min_insync_replicas": 2}})


def test_existing_topic_with_fewer_partitions_is_reported_not_altered(
    make_settings: Callable[..., Settings], kafka_bootstrap: str
) -> None:
    s = make_settings()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(s.kafka.main_topic.name, 2, 1)])[s.kafka.main_topic.name].result(
        10
    )
    with pytest.raises(TopicConfigError) as err:
        ensure_topics(s.kafka)
    text = str(err.value)
    assert "has 2 partitions, profile wants 4 (fewer partitions" in text
    assert "compression.type=producer, profile wants lz4" in text
    assert "nothing was changed" in text
    md = admin.list_topics(topic=s.kafka.main_topic.name, timeout=10)
    assert len(md.topics[s.kafka.main_topic.name].partitions) == 2
    assert s.kafka.dlq_topic.name not in _topics(kafka_bootstrap)


def test_existing_topic_with_other_retention_is_reported(
    make_settings: Callable[..., Settings], kafka_bootstrap: str
) -> None:
    s = make_settings()
    ensure_topics(s.kafka)
    other = make_settings(kafka={"main_topic": {"retention_ms": 86_400_000}})
    other.kafka.main_topic.name = s.kafka.main_topic.name
    other.kafka.dlq_topic.name = s.kafka.dlq_topic.name
    with pytest.raises(TopicConfigError, match=r"retention.ms=604800000, profile wants 86400000"):
        ensure_topics(other.kafka)

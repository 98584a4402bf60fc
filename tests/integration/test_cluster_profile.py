"""The production profile on a real 3-broker KRaft cluster: same code, RF 3, min ISR 2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from qywx_ray.devstack.kafka import KafkaCluster
from qywx_ray.envelope import Envelope
from qywx_ray.kafka.config import producer_config
from qywx_ray.kafka.topics import ensure_topics
from qywx_ray.settings import load_settings
from tests.helpers.kafka import ids_per_user, read_records

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    cluster = KafkaCluster(Path(tmp_path_factory.mktemp("k3")), brokers=3, heap_mb=384).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_production_topics_and_acks_all_on_three_brokers(cluster3: KafkaCluster) -> None:
    s = load_settings(
        profile="production",
        overrides={"kafka": {"bootstrap_servers": cluster3.bootstrap_servers}},
        allow_default_secrets=True,  # the topic layout is under test, not the credentials
    )
    reports = {r.name: r for r in ensure_topics(s.kafka)}
    main = reports["qywx-chat-messages"]
    assert (main.partitions, main.replication_factor) == (12, 3)
    assert main.configs["min.insync.replicas"] == "2"
    assert reports["qywx-dead-letter-queue"].partitions == 6

    producer = Producer(producer_config(s.kafka))
    errors: list[object] = []
    for i in range(200):
        env = Envelope(
            message_id=f"m{i}", open_kfid="wk1", external_userid=f"u{i % 20}", msgtype="text"
        )
        producer.produce(
            s.kafka.main_topic.name,
            env.to_bytes(),
            env.key,
            headers=env.headers(),  # type: ignore[arg-type]  # third-party stubs
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0
    assert errors == []

    seen = ids_per_user(read_records(s, s.kafka.main_topic.name, 200, timeout_s=150))
    assert sum(map(len, seen.values())) == 200
    for ids in seen.values():
        assert ids == sorted(ids, key=lambda mid: int(mid[1:]))  # per-user order, 12 partitions

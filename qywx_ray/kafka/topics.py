"""Create or validate the main and DLQ topics against the profile — never silently alter.

Every check runs before anything is created, so a bad configuration leaves the cluster
untouched: replication factor above the live broker count, min.insync.replicas above
the replication factor, or an existing topic whose partitions, replication or configs
differ from the profile (reported field by field).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ClusterMetadata,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from qywx_ray.errors import InfraError, TopicConfigError
from qywx_ray.kafka.config import admin_config
from qywx_ray.kafka.settings import KafkaSettings, TopicSettings
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)


@dataclass
class TopicReport:
    name: str
    action: str  # "created" | "ok"
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


def _admin(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(admin_config(kafka))


def live_brokers(admin: AdminClient, timeout_s: float = 10.0) -> int:
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise InfraError(f"cannot reach Kafka to read cluster metadata: {exc}") from exc
    return len(md.brokers)


def check_topic_settings(spec: TopicSettings, brokers: int) -> list[str]:
    """Problems that make the profile impossible on this cluster (pure, unit-tested)."""
    problems = []
    if spec.replication_factor > brokers:
        problems.append(
            f"topic {spec.name}: replication_factor={spec.replication_factor} but only "
            f"{brokers} broker(s) are live; use the development profile (RF 1) or start "
            f"{spec.replication_factor} brokers"
        )
    if spec.min_insync_replicas > spec.replication_factor:
        problems.append(
            f"topic {spec.name}: min_insync_replicas={spec.min_insync_replicas} exceeds "
            f"replication_factor={spec.replication_factor}"
        )
    return problems


def diff_existing(
    spec: TopicSettings, partitions: int, replication_factor: int, configs: dict[str, str]
) -> list[str]:
    """How an existing topic differs from the profile (pure, unit-tested)."""
    diffs = []
    if partitions != spec.partitions:
        diffs.append(
            f"topic {spec.name}: has {partitions} partitions, profile wants {spec.partitions}"
            + (
                " (fewer partitions than the profile)"
                if partitions < spec.partitions
                else " (changing the count would move users to other partitions)"
            )
        )
    if replication_factor != spec.replication_factor:
        diffs.append(
            f"topic {spec.name}: replication factor {replication_factor}, "
            f"profile wants {spec.replication_factor}"
        )
    for key, want in spec.topic_configs().items():
        have = configs.get(key)
        if have != want:
            diffs.append(f"topic {spec.name}: {key}={have}, profile wants {want}")
    return diffs


def describe_topic(
    admin: AdminClient, name: str, timeout_s: float
) -> tuple[int, int, dict[str, str]]:
    md = admin.list_topics(topic=name, timeout=timeout_s)
    topic = md.topics[name]
    partitions = len(topic.partitions)
    rf = min((len(p.replicas) for p in topic.partitions.values()), default=0)
    resource = ConfigResource(ResourceType.TOPIC, name)
    futures = admin.describe_configs([resource], request_timeout=timeout_s)
    entries = futures[resource].result(timeout=timeout_s)
    return partitions, rf, {k: v.value for k, v in entries.items()}


def unserved(md: ClusterMetadata, partitions: dict[str, int]) -> list[str]:
    """Topics this broker's metadata does not yet show whole, with a leader for every
    partition (pure, unit-tested)."""
    missing = []
    for name, want in partitions.items():
        topic = md.topics.get(name)
        if (
            topic is None
            or topic.error is not None
            or len(topic.partitions) < want
            or any(p.leader < 0 for p in topic.partitions.values())
        ):
            missing.append(name)
    return missing


def wait_until_served(admin: AdminClient, partitions: dict[str, int], timeout_s: float) -> None:
    """Wait until a broker serves the new topics. CreateTopics returns once the controller
    committed them; a broker may still answer "unknown topic" for a moment, and a consumer
    that subscribes then picks the topic up only at its next metadata refresh (librdkafka:
    topic.metadata.refresh.interval.ms, 5 minutes by default) — "created" must mean usable."""
    deadline = time.monotonic() + timeout_s
    missing = list(partitions)
    while True:
        try:
            missing = unserved(admin.list_topics(timeout=max(1.0, timeout_s / 10)), partitions)
        except KafkaException as exc:
            log.warning("topics.metadata_retry", error=str(exc))
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise InfraError(
                f"topics created but not served by a broker after {timeout_s}s: {missing}"
            )
        time.sleep(0.1)


def _create_topics(
    admin: AdminClient, to_create: list[TopicSettings], timeout_s: float
) -> list[TopicReport]:
    """Create the missing topics (one already created by a racing process counts as
    created); TopicConfigError on any other refusal."""
    reports: list[TopicReport] = []
    if not to_create:
        return reports
    futures = admin.create_topics(
        [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=s.replication_factor,
                config=s.topic_configs(),
            )
            for s in to_create
        ],
        request_timeout=timeout_s,
    )
    for spec in to_create:
        try:
            futures[spec.name].result(timeout=timeout_s)
        except KafkaException as exc:
            err = exc.args[0]
            if getattr(err, "name", lambda: "")() != "TOPIC_ALREADY_EXISTS":
                raise TopicConfigError(f"creating topic {spec.name} failed: {exc}") from exc
        reports.append(
            TopicReport(
                spec.name, "created", spec.partitions, spec.replication_factor, spec.topic_configs()
            )
        )
    return reports


def ensure_topics(kafka: KafkaSettings, timeout_s: float = 30.0) -> list[TopicReport]:
    """Validate everything first, then create what is missing and wait until a broker
    serves it. Raises TopicConfigError."""
    admin = _admin(kafka)
    brokers = live_brokers(admin, timeout_s)
    specs = [kafka.main_topic, kafka.dlq_topic]
    problems = [p for spec in specs for p in check_topic_settings(spec, brokers)]
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    described: dict[str, tuple[int, int, dict[str, str]]] = {}
    for spec in specs:
        if spec.name in existing:
            described[spec.name] = describe_topic(admin, spec.name, timeout_s)
            problems.extend(diff_existing(spec, *described[spec.name]))
    if problems:
        raise TopicConfigError(
            "topic configuration does not match the profile; nothing was changed:\n  - "
            + "\n  - ".join(problems)
        )
    to_create = [s for s in specs if s.name not in existing]
    reports = _create_topics(admin, to_create, timeout_s)
    if to_create:
        wait_until_served(admin, {s.name: s.partitions for s in to_create}, timeout_s)
    for spec in specs:
        if spec.name in described:
            p, rf, cfg = described[spec.name]
            reports.append(
                TopicReport(spec.name, "ok", p, rf, {k: cfg[k] for k in spec.topic_configs()})
            )
    return reports

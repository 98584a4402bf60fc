"""Shared fixtures: real Kafka (KRaft), real Redis, real local Ray — started once per session.

Set QYWX_TEST_BOOTSTRAP / QYWX_TEST_REDIS_URL to reuse services you already run
(faster iteration); otherwise the session starts its own on free loopback ports in a
temporary directory and stops them by PID at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from qywx_ray.settings import Settings, load_settings
from tests.helpers.ray import init_local_ray


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qywx-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(session_dir: Path) -> Iterator[str]:
    external = os.environ.get("QYWX_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    from qywx_ray.devstack.kafka import KafkaCluster

    cluster = KafkaCluster(session_dir / "kafka", brokers=1).start()
    try:
        yield cluster.bootstrap_servers
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_url(session_dir: Path) -> Iterator[str]:
    external = os.environ.get("QYWX_TEST_REDIS_URL")
    if external:
        yield external
        return
    from qywx_ray.devstack.redis import RedisServer

    server = RedisServer(session_dir / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole session (starting Ray costs seconds on 2 cores)."""
    import ray

    init_local_ray()
    yield
    ray.shutdown()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def make_settings(
    kafka_bootstrap: str, redis_url: str, unique: str, session_dir: Path
) -> Callable[..., Settings]:
    """Settings pointing at the test services, with topic names unique to the test."""

    def factory(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "data_dir": str(session_dir / f"data-{unique}"),
            "kafka": {
                "bootstrap_servers": kafka_bootstrap,
                "main_topic": {"name": f"t-main-{unique}"},
                "dlq_topic": {"name": f"t-dlq-{unique}"},
                "consumer": {"group_id": f"g-{unique}"},
            },
            "redis": {"url": redis_url},
        }
        from qywx_ray.settings import _deep_merge

        return load_settings(profile="development", overrides=_deep_merge(base, overrides))

    return factory

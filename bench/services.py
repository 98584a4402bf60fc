"""Kafka and Redis for a bench: throwaway ones it starts (and always stops), or the shared
development services when QYWX_BENCH_BOOTSTRAP / QYWX_BENCH_REDIS_URL point at them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.output import log
from bench.runs import BOOTSTRAP_ENV, REDIS_ENV
from qywx_ray.devstack.procs import die_with_parent


@dataclass
class BenchServices:
    bootstrap_servers: str
    redis_url: str | None
    settings: Any  # qywx_ray.settings.Settings (typed loosely: bench is not a package)
    workdir: Path
    brokers: int
    external: bool
    # Started here (not given by the environment): a bench may reconfigure and reset it
    owns_redis: bool = False
    # Each broker's logs/ (its -Xlog:gc file) when the brokers were started here
    broker_logs: list[Path] = field(default_factory=list)


def settings_for(
    bootstrap_servers: str,
    redis_url: str | None,
    workdir: Path,
    overrides: dict[str, Any] | None = None,
    tag: str | None = None,
) -> Any:
    """Development-profile Settings pointing at the bench services, topics unique to `tag`."""
    from qywx_ray.settings import _deep_merge, load_settings

    tag = tag or uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "data_dir": str(workdir / "data"),
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "main_topic": {"name": f"bench-main-{tag}"},
            "dlq_topic": {"name": f"bench-dlq-{tag}"},
            "consumer": {"group_id": f"bench-{tag}"},
        },
    }
    if redis_url:
        base["redis"] = {"url": redis_url}
    return load_settings(profile="development", overrides=_deep_merge(base, overrides or {}))


def exit_on_sigterm() -> None:
    """Turn SIGTERM (the harness's timeout) into SystemExit so `finally` blocks stop
    services, and have the kernel stop them should those blocks never run.

    The devstack starts Kafka and Redis in their own sessions, out of reach of a signal
    to the bench's process group: only our own cleanup can stop them.
    """
    # If the cleanup never runs (a kill -9, an abort in Ray's shutdown), the kernel stops
    # the services this process starts from now on.
    die_with_parent()
    if threading.current_thread() is not threading.main_thread():
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


@contextlib.contextmanager
def bench_services(
    *,
    brokers: int = 1,
    redis: bool = True,
    overrides: dict[str, Any] | None = None,
    create_topics: bool = True,
) -> Iterator[BenchServices]:
    """Kafka (+ Redis) for one benchmark: throwaway ones in a temp dir, or the given ones.

    With QYWX_BENCH_BOOTSTRAP (and QYWX_BENCH_REDIS_URL) set, those are used and only
    the topics this call created are deleted at the end; otherwise a fresh KafkaCluster
    (1 or 3 brokers) and RedisServer are started and stopped by PID.
    """
    from qywx_ray.devstack.kafka import KafkaCluster
    from qywx_ray.devstack.redis import RedisServer
    from qywx_ray.kafka.topics import ensure_topics

    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="qywx-bench-"))
    cluster: KafkaCluster | None = None
    redis_server: RedisServer | None = None
    external = bool(os.environ.get(BOOTSTRAP_ENV))
    created: list[str] = []
    settings: Any = None
    try:
        bootstrap = os.environ.get(BOOTSTRAP_ENV, "")
        if not bootstrap:
            log(f"bench: starting a throwaway {brokers}-broker Kafka in {workdir}")
            cluster = KafkaCluster(workdir / "kafka", brokers=brokers).start()
            bootstrap = cluster.bootstrap_servers
        redis_url: str | None = None
        if redis:
            redis_url = os.environ.get(REDIS_ENV) or None
            if redis_url is None:
                redis_server = RedisServer(workdir / "redis").start()
                redis_url = redis_server.url
        settings = settings_for(bootstrap, redis_url, workdir, overrides)
        if create_topics:
            reports = ensure_topics(settings.kafka)
            created = [r.name for r in reports if r.action == "created"]
        yield BenchServices(
            bootstrap,
            redis_url,
            settings,
            workdir,
            brokers,
            external,
            owns_redis=redis_server is not None,
            broker_logs=[n.workdir / "logs" for n in cluster.nodes] if cluster else [],
        )
    finally:
        if external and created and settings is not None:
            _delete_topics(settings.kafka, created)
        if redis_server is not None:
            redis_server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _delete_topics(kafka: Any, names: list[str], timeout_s: float = 15.0) -> None:
    from confluent_kafka.admin import AdminClient

    from qywx_ray.kafka.config import admin_config

    # Keep the client referenced until every future resolves: a collected AdminClient
    # silently drops its pending requests.
    admin = AdminClient(admin_config(kafka))
    try:
        futures = admin.delete_topics(names, operation_timeout=timeout_s, request_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout_s)
            except Exception as exc:  # a leftover topic must not fail the benchmark
                log(f"bench: could not delete topic {name}: {exc}")
    except Exception as exc:
        log(f"bench: could not delete topics {names}: {exc}")
    finally:
        del admin


PACE_TICK_S = 0.002  # a paced producer wakes at most every 2 ms (4 records at 2,000/s)


def produce_paced(
    producer: Any, topic: str, records: Sequence[tuple[Any, bytes, Any]], rate: float
) -> float:
    """Produce (key, value, headers) records at `rate` per second, record i due at
    t0 + i / rate: every record due by now, then one sleep of at least PACE_TICK_S (a
    wake-up per tick, not per record: the load generator shares the 2 vCPUs with what it
    measures). A record's Kafka timestamp is when it was produced. Returns t0 as Unix
    time (where the paced load began); does not flush."""
    produced = 0
    t0 = time.monotonic()
    started = time.time()
    while produced < len(records):
        due = min(len(records), int((time.monotonic() - t0) * rate) + 1)
        for key, value, headers in records[produced:due]:
            producer.produce(topic, key=key, value=value, headers=headers)
        produced = max(produced, due)
        producer.poll(0)
        if produced < len(records):
            time.sleep(max(PACE_TICK_S, t0 + produced / rate - time.monotonic()))
    return started

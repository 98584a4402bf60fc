"""Start and stop the consume side: named detached hosts, then partition consumers.

`start_consumers(settings)` is idempotent (actors are named; existing ones are reused)
and returns handles; `stop_consumers(handles)` drains and commits before ending actors.
Never kills an actor that may hold uncommitted work without first asking it to drain.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import ray

from qywx_ray.consume.hosts import consumer_name, host_name, start_hosts
from qywx_ray.consume.partition_consumer import PartitionConsumer
from qywx_ray.obs.logging import get_logger
from qywx_ray.placement import actor_options
from qywx_ray.settings import Settings

log = get_logger(__name__)


@dataclass
class ConsumePipeline:
    settings: Settings
    hosts: list[Any]
    consumers: list[Any]

    def snapshots(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        return list(ray.get([c.snapshot.remote() for c in self.consumers], timeout=timeout_s))

    def wait_assigned(self, partitions: int, timeout_s: float = 60.0) -> bool:
        """True once every consumer owns partitions and together they own all of them."""
        deadline = time.monotonic() + timeout_s
        want = min(len(self.consumers), partitions)
        while time.monotonic() < deadline:
            owned = [s["assigned"] for s in self.snapshots()]
            if sum(1 for a in owned if a) >= want and sum(len(a) for a in owned) == partitions:
                return True
            time.sleep(0.1)
        return False

    def wait_pool_full(self, timeout_s: float = 120.0) -> bool:
        """Dedicated mode: True once the warm pool lists `dedicated_pool_size` spares that
        answered (consumer 0 keeps it; dedicated_pool.py)."""
        want = self.settings.consume.dedicated_pool_size
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pool = ray.get(self.consumers[0].snapshot.remote(), timeout=10)["pool"] or {}
            if pool.get("spares", 0) >= want:
                return True
            time.sleep(0.1)
        return False


def start_consumer(settings: Settings, index: int) -> Any:
    return PartitionConsumer.options(  # type: ignore[attr-defined]
        name=consumer_name(settings, index),
        namespace=settings.consume.namespace,
        lifetime="detached",
        get_if_exists=True,
        max_concurrency=8,  # threaded: `complete` runs while the poll thread works
        **actor_options(settings.placement, "consumer"),
    ).remote(settings, index)


def start_consumers(settings: Settings) -> ConsumePipeline:
    hosts = start_hosts(settings)
    consumers = [start_consumer(settings, i) for i in range(settings.consume.num_consumers)]
    ray.get([c.pid.remote() for c in consumers], timeout=120)
    log.info(
        "consume.started", hosts=len(hosts), consumers=len(consumers), mode=settings.consume.mode
    )
    return ConsumePipeline(settings, hosts, consumers)


def user_actor_names(namespace: str) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == namespace and str(a.get("name", "")).startswith("user:")
    ]


def stop_consumers(
    pipeline: ConsumePipeline, timeout_s: float = 60.0, kill_hosts: bool = True
) -> list[dict[str, Any]]:
    """Graceful: each consumer drains in-flight work (bounded), commits, leaves the group."""
    s = pipeline.settings
    refs = [c.stop.remote(timeout_s) for c in pipeline.consumers]
    results: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s + 5
    for ref in refs:
        try:
            results.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
        except Exception as exc:  # noqa: BLE001 - stopping: one consumer failing to answer must not stop the others
            log.warning("consume.stop_failed", error=str(exc))
    for c in pipeline.consumers:
        ray.kill(c, no_restart=True)
    if kill_hosts:
        for h in pipeline.hosts:
            ray.kill(h, no_restart=True)
        for name in user_actor_names(s.consume.namespace):
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=s.consume.namespace), no_restart=True)
    return results


def find_pipeline(settings: Settings) -> ConsumePipeline:
    """Handles to the running actors (for the CLI and admin routes)."""
    ns = settings.consume.namespace
    c = settings.consume
    hosts = [ray.get_actor(host_name(settings, i), namespace=ns) for i in range(c.num_hosts)]
    consumers = [
        ray.get_actor(consumer_name(settings, i), namespace=ns) for i in range(c.num_consumers)
    ]
    return ConsumePipeline(settings, hosts, consumers)

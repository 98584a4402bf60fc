"""Long fault drills (`make drills`): brokers, Redis, actors killed mid-stream.

Each drill keeps customers chatting while the fault happens, then audits the outcome
against the simulator's ground truth and prints
`lost=0 reordered=0 duplicated_side_effects=0` (or the failures).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from qywx_ray.devstack.pipeline import LocalPipeline
from tests.drills.conftest import chat, finish

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Chatter:
    """Customers chatting in the background for the length of a fault."""

    def __init__(self, p: LocalPipeline, kfids: list[str], users: int) -> None:
        self.p, self.kfids, self.users = p, kfids, users
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.total += chat(self.p, self.kfids, self.users, rounds=1, per_round=1)
            self._stop.wait(0.2)

    def __enter__(self) -> Chatter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_kafka_fully_down_60s(pipeline_factory: Callable[..., LocalPipeline]) -> None:
    p = pipeline_factory(overrides={"ingest": {"delivery_wait_timeout_s": 5.0}})
    with Chatter(p, ["wkK1", "wkK2"], users=6) as chatter:
        time.sleep(5)
        p.kill_broker(1)
        time.sleep(60)  # the fault's duration, not a synchronisation
        p.restart_broker(1)
        time.sleep(5)
    finish(p, chatter.total, timeout_s=240)


def test_redis_down_10s(pipeline_factory: Callable[..., LocalPipeline]) -> None:
    p = pipeline_factory()
    with Chatter(p, ["wkR"], users=8) as chatter:
        time.sleep(5)
        p.kill_redis()
        time.sleep(10)
        p.restart_redis()
        time.sleep(5)
    finish(p, chatter.total, timeout_s=240)


def test_three_brokers_leader_of_busy_partition_killed(
    pipeline_factory: Callable[..., LocalPipeline],
) -> None:
    from confluent_kafka.admin import AdminClient

    p = pipeline_factory(brokers=3)
    assert p.settings is not None
    with Chatter(p, ["wkL"], users=10) as chatter:
        time.sleep(5)
        md = AdminClient({"bootstrap.servers": p.settings.kafka.bootstrap_servers}).list_topics(
            p.settings.kafka.main_topic.name, timeout=10
        )
        leader = md.topics[p.settings.kafka.main_topic.name].partitions[0].leader
        p.kill_broker(leader)
        time.sleep(20)
        p.restart_broker(leader)
        time.sleep(5)
    finish(p, chatter.total, timeout_s=240)


def test_actors_killed_mid_stream(pipeline_factory: Callable[..., LocalPipeline]) -> None:
    import ray

    p = pipeline_factory()
    assert p.settings is not None
    with Chatter(p, ["wkX1", "wkX2"], users=8) as chatter:
        time.sleep(4)
        p.kill_consumer(0)
        time.sleep(4)
        p.kill_host(1)
        time.sleep(4)
        recovery = ray.get_actor(
            p.settings.dlq.recovery_actor_name, namespace=p.settings.ray_namespace
        )
        os.kill(int(ray.get(recovery.pid.remote(), timeout=30)), signal.SIGKILL)
        time.sleep(4)
        # A Serve replica: WeCom retries unanswered callbacks; the sweep pulls anyway.
        from ray.util.state import list_actors

        for actor in list_actors(filters=[("class_name", "=", "ServeReplica")], limit=50):
            if actor.get("state") == "ALIVE" and p.serve_app in str(actor.get("name", "")):
                os.kill(int(actor["pid"]), signal.SIGKILL)
                break
        time.sleep(6)
    finish(p, chatter.total, timeout_s=240)

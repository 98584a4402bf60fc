"""Graceful shutdown of every component, against real Redis, Kafka, Ray.

- ingress: the lifespan shutdown Serve runs after answering in-flight callbacks sends the
  pull requests the replica still holds;
- syncer host: a pull in progress is cut at its bound, its lock is released, the cursor
  stays at the last page Kafka acked, the producer is flushed;
- DLQ recovery: retries it holds a lease on go back to the delay queue at once;
- `qywx-ray start --foreground`: SIGTERM drains the consumers (everything in flight is
  processed and committed), stops every actor it started, and exits 0 within a bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from qywx_ray.dlq.message import KafkaSource, make_dead_letter
from qywx_ray.dlq.recovery import RecoveryService
from qywx_ray.envelope import Envelope
from qywx_ray.ingress.dispatch import PullDispatcher
from qywx_ray.ingress.syncer_host import SyncerHostService
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from qywx_ray.wecom.models import KfCallbackEvent
from tests.helpers.ingest import FakePage, create_topic, make_pages, read_topic
from tests.helpers.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


# ---------------------------------------------------------------- ingress


async def test_ingress_shutdown_sends_the_pull_requests_it_holds(
    make_settings: Callable[..., Settings],
) -> None:
    from qywx_ray.ingress.app import create_app

    sent: list[tuple[int, list[tuple[str, str]]]] = []

    async def send(host: int, items: list[tuple[str, str]]) -> object:
        sent.append((host, items))
        return len(items)

    # The dispatcher's own flusher would wait 30 s: only the shutdown can send it in time.
    sink = PullDispatcher(send, 1, flush_interval_s=30.0)
    app = create_app(make_settings(), sink=sink, admin=False)
    event = KfCallbackEvent.model_validate(
        {
            "ToUserName": "corp",
            "CreateTime": int(time.time()),
            "MsgType": "event",
            "Event": "kf_msg_or_event",
            "Token": "tok-1",
            "OpenKfId": "wkShut",
        }
    )
    async with app.router.lifespan_context(app):
        sink.submit(event)  # what an answered callback leaves behind
        await asyncio.sleep(0.05)
        assert sent == []
    assert sent == [(0, [("wkShut", "tok-1")])]
    assert sink.pending == 0


# ---------------------------------------------------------------- syncer host


class StallingSource:
    """kf/sync_msg: page 0 at once, then a pull that never answers (a slow WeCom)."""

    def __init__(self, page: list[dict[str, Any]]) -> None:
        self.page = page
        self.calls: list[str] = []
        self.closed = False
        self.cancelled = 0  # pulls the close gave up on

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
        self.calls.append(cursor)
        if not cursor:
            return FakePage(next_cursor="1", has_more=True, msg_list=self.page)
        try:
            await asyncio.Event().wait()  # never answers: only cancellation ends it
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.closed = True


async def test_syncer_host_close_releases_the_lock_and_keeps_the_cursor_at_the_acked_page(
    make_settings: Callable[..., Settings], redis_client: redis.Redis, unique: str
) -> None:
    kfid = f"wk{unique}"
    settings = make_settings(ingest={"lock_ttl_s": 60.0, "sweep_interval_s": 60.0})
    create_topic(settings)
    page = make_pages(1, 20, users=4, kfid=kfid)[0]
    service = SyncerHostService(settings, 0, 1)
    source = StallingSource(page)
    service.wecom = source  # type: ignore[assignment]
    lock_key = f"{settings.ingest.key_prefix}:lock:sync:{kfid}"
    await service.request_pulls([(kfid, "")])
    deadline = time.monotonic() + 30
    while source.calls != ["", "1"]:  # page 0 produced + cursor moved; page 1 hangs
        assert time.monotonic() < deadline, source.calls
        await asyncio.sleep(0.02)
    assert redis_client.exists(lock_key) == 1  # the stalled pull holds its lock

    # Bounded although WeCom never answers: the close cancels the stalled pull.
    undelivered = await asyncio.wait_for(service.close(timeout_s=1.0), 60)
    assert source.cancelled == 1
    assert undelivered == 0
    assert redis_client.exists(lock_key) == 0  # released, not left to expire in 60 s
    cursor = redis_client.hget(f"{settings.ingest.key_prefix}:cursor:{kfid}", "cursor")
    assert cursor == b"1"
    in_kafka = sorted(env.message_id for _, _, env in read_topic(settings, len(page)))
    assert in_kafka == sorted(m["msgid"] for m in page)  # the cursor == what Kafka holds
    assert source.closed


# ---------------------------------------------------------------- DLQ recovery


def test_recovery_close_hands_leased_retries_back_to_the_delay_queue(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    # A main topic nobody can reach: the retry produce fails and its lease stays held.
    settings = make_settings(
        kafka={"bootstrap_servers": "127.0.0.1:1"},
        dlq={"retry_produce_timeout_s": 1.0, "lease_s": 600.0},
    )
    service = RecoveryService(settings)
    letter = make_dead_letter(
        reason=FailureReason.DOWNSTREAM_ERROR,
        failure_time=time.time() - 3600,
        settings=settings.dlq,
        envelope=Envelope(
            message_id="m-lease", open_kfid="kf", external_userid="u1", msgtype="text", raw={}
        ),
        source=KafkaSource(topic=settings.kafka.main_topic.name, partition=0, offset=0),
    )
    service.queue.schedule_many([(letter.entry_id(), time.time() - 1, letter.to_bytes())])
    assert service.schedule_once() == 0  # claimed, produce failed: still leased
    assert service.queue.counts() == (0, 1)
    released = service.close(timeout_s=2.0)
    assert released == 1
    assert service.queue.counts() == (1, 0)  # due again now, not in 600 s


# ---------------------------------------------------------------- qywx-ray start


def _produce(settings: Settings, n: int, hold_key: str) -> list[str]:
    from qywx_ray.testing.consume import envelopes, produce

    items = envelopes(4, n // 4, prefix=f"g{os.getpid()}-", hold=hold_key)
    produce(settings, items)
    return [e.message_id for e in items]


def _named(namespace: str) -> list[str]:
    from ray.util import list_named_actors

    return sorted(
        a["name"] for a in list_named_actors(all_namespaces=True) if a["namespace"] == namespace
    )


def test_start_foreground_sigterm_drains_commits_and_stops_everything(
    ray_session: None,
    make_settings: Callable[..., Settings],
    redis_client: redis.Redis,
    unique: str,
    tmp_path: Path,
) -> None:
    import ray

    from qywx_ray.testing.consume import committed_offsets, records

    namespace = f"shut-{unique}"
    overrides: dict[str, Any] = {
        "consume": {
            "namespace": namespace,
            "name_prefix": f"s{unique}",
            "handler": "qywx_ray.testing.handlers:recording_handler",
            "record_key": f"rec:{unique}",
            "num_hosts": 1,
            "num_consumers": 1,
            "static_membership": False,
            "commit_interval_s": 30.0,  # only the shutdown commit can make it in time
            "commit_every_messages": 1_000_000,
        },
        "protect": {"enabled": False},
        "dlq": {"recovery_actor_name": f"qywx-rec-{unique}"},
    }
    settings = make_settings(**overrides)
    create_topic(settings)
    config = tmp_path / "qywx.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    hold_key = f"hold:{unique}"
    ids = _produce(settings, 40, hold_key)  # every handler waits for hold_key

    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "qywx_ray.cli", "--config", str(config), "start"),
            *("--foreground", "--no-serve", "--stop-timeout-s", "20"),
            *("--address", ray.get_runtime_context().gcs_address),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while "running;" not in (proc.stdout.readline() or ""):
            assert proc.poll() is None, "start did not come up"
            assert time.monotonic() < deadline, "start did not come up"
        key = settings.consume.record_key
        calls = f"{key}:calls"
        consumer = ray.get_actor(f"s{unique}-consumer-0", namespace=namespace)

        def snapshot() -> dict[str, Any]:
            return ray.get(consumer.snapshot.remote(), timeout=10)  # type: ignore[call-overload, return-value]  # third-party stubs

        # Every message is in flight: handed to the host, handlers waiting on hold_key.
        wait_until(
            lambda: snapshot()["inflight"] >= len(ids),
            timeout_s=max(1.0, deadline - time.monotonic()),
            what="every message in flight",
            interval_s=0.2,
        )
        assert redis_client.llen(key) == 0
        proc.send_signal(signal.SIGTERM)
        # Release the handlers only once the consumer drains: the drain must wait for them.
        wait_until(lambda: snapshot()["stopping"], timeout_s=60, what="the consumer to drain")
        redis_client.set(hold_key, "1")
        started = time.monotonic()
        out, _ = proc.communicate(timeout=120)
        stop_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    print(f"\nqywx-ray start: stopped in {stop_s:.1f}s after the handlers were released\n{out}")
    assert proc.returncode == 0, out  # stopped on its own within communicate()'s 120 s
    done = [m for _, m in records(redis_client, key)]
    assert sorted(done) == sorted(ids)  # every in-flight message was processed
    assert redis_client.llen(calls) == len(ids)  # once each
    end = sum(max(0, o) for o in committed_offsets(settings, settings.kafka.main_topic.partitions))
    assert end == len(ids)  # and committed before the consumer left
    assert _named(namespace) == []  # every actor `start` created is gone
    assert _group_members(settings) == 0  # the consumer left the group


def _group_members(settings: Settings) -> int:
    from confluent_kafka.admin import AdminClient

    from qywx_ray.kafka.config import admin_config

    admin = AdminClient(admin_config(settings.kafka))
    group = settings.kafka.consumer.group_id
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return len(desc.members)

"""Redis killed (-9) under the consume path mid-stream, then restarted from its AOF.

With `consume.redis_down_policy = stop` (the default) nothing may complete while the
done-flags, the parking lot and the limiter are unreachable: committed offsets stand
still, and after the restart every message is handled once, in per-user order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from qywx_ray.consume.pipeline import ConsumePipeline, start_consumers
from qywx_ray.consume.testing import (
    check_order,
    committed_offsets,
    ensure_topics,
    envelopes,
    produce,
    records,
    wait_for,
)
from qywx_ray.devstack.procs import free_port
from qywx_ray.devstack.redis import RedisServer
from qywx_ray.settings import Settings
from tests.helpers.consume import RECORD, consume_test_settings

pytestmark = pytest.mark.integration

OUTAGE_S = 6.0  # the fault's duration, not a synchronisation


@pytest.mark.timeout(240)
def test_redis_killed_mid_stream_stops_commits_then_resumes_in_order(
    make_settings: Callable[..., Settings],
    unique: str,
    started: list[ConsumePipeline],
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", port=free_port(), appendfsync="always").start()
    client = redis_lib.Redis.from_url(server.url, socket_timeout=5)
    try:
        s = consume_test_settings(
            make_settings, unique, kafka_consumer={"poll_batch_max": 200}
        ).model_copy(deep=True)
        s.redis.url = server.url
        s.protect.enabled = True  # the limiter's Redis calls are in the outage too,
        s.protect.default.max_messages = 100_000  # with a rule these 40 messages pass
        s.protect.default.penalty_threshold = 100_000
        ensure_topics(s)
        msgs = envelopes(40, 40)
        produce(s, msgs)
        p = start_consumers(s)
        started.append(p)
        assert wait_for(lambda: client.llen(RECORD) >= 200, 60)

        server.kill9()
        time.sleep(1.0)  # completions whose flags were durable before the kill may commit
        frozen = committed_offsets(s, 4)
        time.sleep(OUTAGE_S)
        during = committed_offsets(s, 4)
        assert during == frozen, f"commits advanced while Redis was down: {frozen} -> {during}"
        assert sum(max(0, o) for o in during) < len(msgs)  # really mid-stream

        server.start()
        client = redis_lib.Redis.from_url(server.url, socket_timeout=5)
        assert wait_for(lambda: client.llen(RECORD) >= len(msgs), 120), client.llen(RECORD)
        rep = check_order(records(client, RECORD), msgs)
        assert rep.missing == [], f"lost {len(rep.missing)}"
        assert rep.inversions == 0
        assert rep.duplicates == 0
        after_done = client.lrange(f"{RECORD}:after_done", 0, -1)
        assert after_done == [], f"handled again after done: {after_done[:5]}"
        assert wait_for(lambda: sum(max(0, o) for o in committed_offsets(s, 4)) == len(msgs), 60)
        reruns = int(client.llen(f"{RECORD}:calls")) - len(msgs)
        print(f"redis outage: committed at kill {sum(max(0, o) for o in frozen)}, reruns {reruns}")
    finally:
        client.close()
        server.stop()

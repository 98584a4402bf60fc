"""Drill: Redis Sentinel fails the master over while customers chat (in `make test`).

The whole pipeline (own Kafka, simulator, Serve ingress, consumers, DLQ recovery) runs on
a real Sentinel setup (1 master, 1 replica, 3 sentinels) whose data nodes refuse writes
without a replica (`min-replicas-to-write 1`, as the README asks of production). Mid-stream
the master is failed over. Then: every message processed once, in per-user order, none
dead-lettered (Redis trouble is retried in place, not parked behind a 60 s DLQ backoff),
the pipeline drains within a bound, and no WeCom cursor in Redis went backwards except
once per account at the failover itself (see CursorWatch).

Root cause of an earlier failure: during a Sentinel failover the old master keeps
accepting writes for ~1 s after its replica was promoted; the promotion then discards them
(full resync), so effects, done-flags and cursors acknowledged in that window vanished —
the drill could never drain. min-replicas-to-write turns those writes into NOREPLICAS
errors, which the clients (qywx_ray/store/client.py) retry on the new master.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qywx_ray.devstack.pipeline import LocalPipeline
from tests.helpers.drills import Chatter, finish

# Pipeline start (~60 s here: Kafka, Serve, actors) + 13 s of chat + the drain.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

KFIDS = ["wkS1", "wkS2"]
DRAIN_BOUND_S = 90.0


def _cursor_seq(raw: bytes | None) -> int:
    """The simulator's cursor is base64("<tag>:<seq>"): its position in the kf log."""
    if raw is None:
        return -1
    text = raw.decode()
    return int(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().split(":")[1])


class CursorWatch:
    """Samples every cursor from Redis (through the Sentinel client) while the drill runs
    and records any step backwards, and whether it came before the failover began.

    One step back per account at the failover is Redis's replication, not ours: the
    watcher can read a cursor the old master accepted but had not yet shipped to its
    replica, which the promotion then discards (min-replicas-to-write bounds the replica's
    lag, not each write). The syncer re-pulls from the older cursor; what that re-pull
    produces again is de-duplicated downstream (the drill's no-duplicate-effects check).
    Any step back before the failover, or a second one, is a bug of ours."""

    def __init__(self, p: LocalPipeline) -> None:
        self.client = p.redis_client()
        self.seen: dict[str, list[int]] = {k: [] for k in KFIDS}
        self.regressions: list[str] = []
        self.regressed: dict[str, int] = {k: 0 for k in KFIDS}
        self.before_failover: list[str] = []
        self.failover_began = threading.Event()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for kfid in KFIDS:
                try:
                    seq = _cursor_seq(self.client.hget(f"qywx:cursor:{kfid}", "cursor"))
                except Exception:  # the client gave up within its budget: count it
                    self.errors += 1
                    continue
                history = self.seen[kfid]
                if history and seq < history[-1]:
                    step = f"{kfid}: {history[-1]} -> {seq}"
                    self.regressions.append(step)
                    self.regressed[kfid] += 1
                    if not self.failover_began.is_set():
                        self.before_failover.append(step)
                history.append(seq)
            self._stop.wait(0.05)

    def __enter__(self) -> CursorWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_sentinel_failover_mid_stream(
    pipeline_factory: Callable[..., LocalPipeline], tmp_path: Path
) -> None:
    from qywx_ray.devstack.sentinel import SentinelCluster

    with SentinelCluster(tmp_path / "sentinel", min_replicas_to_write=1) as cluster:
        sentinel = {
            "redis": {
                "mode": "sentinel",
                "master_name": cluster.master_name,
                "sentinel_addrs": cluster.sentinel_addrs,
            }
        }
        p = pipeline_factory(redis_url="sentinel", overrides=sentinel)
        old = cluster.master()
        with CursorWatch(p) as watch:
            with Chatter(p, KFIDS, users=6) as chatter:
                time.sleep(5)
                watch.failover_began.set()
                new = cluster.failover()
                time.sleep(8)
            assert new != old
            started = time.monotonic()
            result = finish(p, chatter.total, timeout_s=DRAIN_BOUND_S)
            drained_s = time.monotonic() - started
            # the cursors end where the simulator's log ends, after every sample
            final = {
                k: _cursor_seq(p.redis_client().hget(f"qywx:cursor:{k}", "cursor")) for k in KFIDS
            }
        print(f"drill: drained in {drained_s:.1f}s after the chat; cursors {final}")
        assert not watch.before_failover, watch.before_failover
        assert all(n <= 1 for n in watch.regressed.values()), watch.regressions
        assert all(len(v) > 20 for v in watch.seen.values()), "the cursor watch saw too little"
        assert all(final[k] >= max(watch.seen[k]) for k in KFIDS)
        assert result.lost == 0
        assert result.reordered_users == 0
        assert result.duplicated_side_effects == 0
        assert result.processed >= result.messages  # every message's effect, none parked
        assert result.dead_lettered == 0, "a Redis failover must not dead-letter messages"

"""Partition consumers: Kafka in, batches to user hosts out, safe commits.

Each `PartitionConsumer` actor owns one confluent-kafka consumer in the group and a
poll thread: poll a batch, group it by target (host or dedicated user actor), one Ray
call per target, keep every message in flight until its completion comes back (pushed
in batches by the hosts to `complete`). Commits carry explicit per-partition watermarks
(smallest unfinished offset). When a target died or restarted (call failed, incarnation
changed) everything still in flight for it is re-sent, in original order, before any new
message; done-flags absorb what had already run. Never: commit past an unfinished
offset, send message N+1 of a user to a new actor while N may still be with the old one,
or hold a partition for one user's flood (denials complete at once in the host).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from qywx_ray.consume.hosts import (
    UserActorDying,
    get_or_create_user_actor,
    host_index,
    host_name,
    tune_gc,
    user_actor_name,
)
from qywx_ray.consume.types import (
    DRAIN_HEADER,
    Delivery,
    PackedDone,
    pack_deliveries,
    unpack_done,
)
from qywx_ray.consume.watermark import CommitPolicy, WatermarkTable
from qywx_ray.dlq.strategies import is_dlq_retry, retry_count_of
from qywx_ray.envelope import header_value
from qywx_ray.kafka.config import consumer_config
from qywx_ray.obs.logging import configure_logging, get_logger
from qywx_ray.obs.metrics import counter, gauge
from qywx_ray.settings import Settings

log = get_logger(__name__)

m_consumed = counter("qywx_messages_consumed_total", "Records polled from Kafka")
m_partition = counter(
    "qywx_partition_messages_total", "Records polled, by partition", ["partition"]
)
m_commits = counter("qywx_commits_total", "Offset commits issued")
m_rebalances = counter("qywx_rebalances_total", "Partition assignments and revocations")
m_lag = gauge("qywx_consumer_lag", "High watermark minus committed offset", ["partition"])
m_resent = counter("qywx_messages_resent_total", "Messages re-sent after a target failed")
m_inflight = gauge("qywx_consumer_inflight", "Messages in flight", ["consumer"])

READY = "ready"
RECOVERING = "recovering"


@dataclass
class Target:
    """A host or dedicated user actor and the messages it holds for this consumer."""

    key: str  # actor name
    dedicated: bool
    handle: Any = None
    incarnation: str | None = None
    state: str = RECOVERING
    epoch: int = 0
    inflight: OrderedDict[tuple[str, int, int], Delivery] = field(default_factory=OrderedDict)
    next_try_s: float = 0.0
    backoff_s: float = 0.05
    recovery_ref: Any = None
    recovery_started_s: float = 0.0
    health_ref: Any = None
    last_used_s: float = 0.0


class PartitionConsumerCore:
    """Everything but the Ray actor shell; runs its own poll thread."""

    def __init__(self, settings: Settings, index: int, crash_on_error: bool = False) -> None:
        self.settings = settings
        self.crash_on_error = crash_on_error
        self.c = settings.consume
        self.index = index
        self.name = f"{self.c.name_prefix}-consumer-{index}"
        # Completions are addressed to this instance: hosts resolve the name afresh for a
        # new instance, never reuse a handle to a consumer that was replaced by name.
        self.instance = f"{self.name}#{uuid.uuid4().hex[:8]}"
        self.topic = settings.kafka.main_topic.name
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self.table = WatermarkTable()
        self.policy = CommitPolicy(self.c.commit_every_messages, self.c.commit_interval_s)
        self.targets: dict[str, Target] = {}
        self._where: dict[tuple[str, int, int], str] = {}
        self._refs: dict[Any, tuple[str, str, int]] = {}  # ref -> (target, kind, epoch)
        self._assigned: set[tuple[str, int]] = set()
        self._revoking: set[tuple[str, int]] = set()
        self._paused = False
        self._placement: dict[str, str] = {}  # user -> target key (dedicated mode)
        self._host_names = [host_name(settings, i) for i in range(self.c.num_hosts)]
        self._last_health_s = 0.0
        self._last_commit_s = 0.0
        self._last_batch_s = 0.0  # when the previous poll batch left (poll linger)
        self.stats = {
            "consumed": 0,
            "completed": 0,
            "resent": 0,
            "recoveries": 0,
            "commits": 0,
            "rebalances": 0,
        }
        self.error: str | None = None
        self.first_consumed_unix_s: float | None = None  # benchmarks time drains from it
        self.consumer: Consumer | None = None
        self._thread = threading.Thread(target=self._run, name=f"poll-{index}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ Kafka loop

    def _make_consumer(self) -> Consumer:
        extra: dict[str, Any] = {"on_commit": self._on_commit}
        if self.c.static_membership:
            extra["group.instance.id"] = self.name
        conf = consumer_config(self.settings.kafka, **extra)
        consumer = Consumer(conf)
        consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    def _run(self) -> None:
        try:
            self.consumer = self._make_consumer()
            kc = self.settings.kafka.consumer
            while not self._stop.is_set():
                self._service()
                msgs = self._poll(kc.poll_batch_max, kc.poll_timeout_s)
                if msgs:
                    self._dispatch(msgs)
            self._drain(self.c.revoke_wait_s)
            self._commit(sync=True)
            self.consumer.close()  # revokes (and commits) what is left
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("consumer.loop_failed", exc_info=True, consumer=self.name)
            if self.crash_on_error:  # crash-only: Ray restarts us from the last commit
                os._exit(70)
        finally:
            self._stopped.set()

    def _poll(self, max_n: int, timeout_s: float) -> list[Any]:
        """Wait up to timeout_s for the FIRST record, then take what is queued, lingering
        only until `poll_linger_ms` after the previous batch: a record after a quiet spell
        leaves at once (a cold user's first message is not held back), while under load
        batches leave at most every `poll_linger_ms` and grow with the rate (fewer Ray
        calls and Redis round trips per message)."""
        assert self.consumer is not None
        first = self.consumer.poll(timeout_s)
        if first is None:
            return []
        if max_n <= 1:
            return [first]
        wait_s = self._last_batch_s + self.c.poll_linger_ms / 1000.0 - time.monotonic()
        rest = self.consumer.consume(max_n - 1, max(0.0, wait_s))
        self._last_batch_s = time.monotonic()
        return [first, *rest]

    def _dispatch(self, msgs: list[Any]) -> None:
        now = time.monotonic()
        if self.first_consumed_unix_s is None:
            self.first_consumed_unix_s = time.time()
        groups: dict[str, list[Delivery]] = {}
        per_partition: dict[int, int] = {}
        wall_ms = int(time.time() * 1000)
        with self._lock:
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer.record_error", error=str(err))
                    continue
                topic, partition, offset = m.topic(), m.partition(), m.offset()
                if (topic, partition) in self._revoking:
                    continue
                if not self.table.get(topic, partition).add(offset):
                    continue
                key = (m.key() or b"").decode("utf-8", "replace")
                headers = m.headers()
                ts = m.timestamp()[1]
                value = m.value() or b""
                msg_id, retry_count, is_retry, is_drain = _routing_headers(headers)
                d = Delivery(
                    topic,
                    partition,
                    offset,
                    ts if ts > 0 else wall_ms,
                    key,
                    value,
                    msg_id,
                    self.instance,
                    retry_count,
                    is_retry,
                    is_drain,
                )
                target = self._target_for(key, value, headers, now)
                target.inflight[d.tpo] = d
                target.last_used_s = now
                self._where[d.tpo] = target.key
                groups.setdefault(target.key, []).append(d)
                per_partition[partition] = per_partition.get(partition, 0) + 1
            self.stats["consumed"] += len(msgs)
            m_consumed.inc(len(msgs))
            for partition, n in per_partition.items():
                m_partition.inc(n, partition=str(partition))
            for key, batch in groups.items():
                t = self.targets[key]
                if t.state == READY:
                    self._send(t, batch)
            self._backpressure()

    def _target_for(self, user: str, value: bytes, headers: Any, now: float) -> Target:
        if self.c.mode == "dedicated":
            key = self._placement.get(user)
            if key is None:
                dedicated_count = sum(1 for t in self.targets.values() if t.dedicated)
                cap = max(1, self.c.max_dedicated_actors // self.c.num_consumers)
                if dedicated_count < cap:
                    key = user_actor_name(self._open_kfid(value, headers), user)
                else:  # over the cap: this user is hosted (sticky while we remember it)
                    key = host_name(self.settings, host_index(user, self.c.num_hosts))
                self._placement[user] = key
            t = self.targets.get(key)
            if t is None:
                t = self.targets[key] = Target(key, dedicated=key.startswith("user:"))
            return t
        key = self._host_names[host_index(user, self.c.num_hosts)]
        t = self.targets.get(key)
        if t is None:
            t = self.targets[key] = Target(key, dedicated=False)
        return t

    @staticmethod
    def _open_kfid(value: bytes, headers: Any) -> str:
        kfid = header_value(headers, "open_kfid")
        if kfid is not None:
            return kfid
        try:
            return str(json.loads(value).get("open_kfid", ""))
        except (ValueError, AttributeError):
            return ""

    # ------------------------------------------------------------ Ray calls

    def _send(self, t: Target, batch: list[Delivery]) -> None:
        packed = pack_deliveries(batch)
        ref = t.handle.deliver.options(enable_task_events=False).remote(packed, t.incarnation)
        self._refs[ref] = (t.key, "deliver", t.epoch)

    def _start_recovery(self, t: Target, why: str) -> None:
        if t.state == RECOVERING and t.recovery_ref is not None:
            return
        log.warning("consumer.target_recovering", target=t.key, why=why, inflight=len(t.inflight))
        self.stats["recoveries"] += 1
        t.state = RECOVERING
        t.epoch += 1
        t.recovery_ref = None
        t.health_ref = None

    def _try_recover(self, t: Target, now: float) -> None:
        if t.recovery_ref is not None or now < t.next_try_s:
            return
        try:
            if t.handle is None or t.dedicated:
                if t.dedicated:
                    t.handle = get_or_create_user_actor(self.settings, t.key)
                else:
                    t.handle = ray.get_actor(t.key, namespace=self.c.namespace)
            ref = t.handle.incarnation_id.remote()
        except Exception as exc:  # name not registered yet / GCS hiccup
            log.warning("consumer.recovery_retry", target=t.key, error=str(exc))
            t.next_try_s = now + t.backoff_s
            t.backoff_s = min(t.backoff_s * 2, 2.0)
            return
        t.recovery_ref = ref
        t.recovery_started_s = now
        self._refs[ref] = (t.key, "recover", t.epoch)

    def _service(self) -> None:
        """Check finished Ray calls, recover targets, probe health, commit, pace fetching."""
        now = time.monotonic()
        with self._lock:
            for t in list(self.targets.values()):
                if t.state == RECOVERING:
                    if t.recovery_ref is not None and now - t.recovery_started_s > 60.0:
                        self._refs.pop(t.recovery_ref, None)
                        t.recovery_ref = None
                    if t.inflight or not t.dedicated:
                        self._try_recover(t, now)
            if now - self._last_health_s >= self.c.health_check_interval_s:
                self._last_health_s = now
                for t in self.targets.values():
                    if t.state == READY and t.inflight and t.health_ref is None:
                        t.health_ref = t.handle.incarnation_id.remote()
                        self._refs[t.health_ref] = (t.key, "health", t.epoch)
                self._forget_idle_targets(now)
            refs = list(self._refs)
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                self._on_ref(ref)
        if self.policy.due(now) or now - self._last_commit_s >= self.c.commit_interval_s:
            # the interval path also retries commits that failed (e.g. during a rebalance)
            self._commit(sync=False)
        if self._paused:  # completions arrive on other threads; resume from here
            with self._lock:
                self._backpressure()

    def _on_ref(self, ref: Any) -> None:
        with self._lock:
            key, kind, epoch = self._refs.pop(ref)
            t = self.targets.get(key)
            if t is None:
                return
            try:
                incarnation = ray.get(ref, timeout=0)
                error = None
            except (RayError, GetTimeoutError) as exc:
                incarnation, error = None, exc
            if kind == "health":
                t.health_ref = None
            if epoch != t.epoch:
                return  # a call to an instance we already gave up on
            if kind == "recover":
                t.recovery_ref = None
                if error is not None:
                    t.next_try_s = time.monotonic() + t.backoff_s
                    t.backoff_s = min(t.backoff_s * 2, 2.0)
                    if not (isinstance(error, RayActorError) or _is(error, UserActorDying)):
                        log.warning("consumer.recovery_failed", target=t.key, error=str(error))
                    return
                first = t.incarnation is None
                t.incarnation = incarnation
                t.state = READY
                t.epoch += 1
                t.backoff_s = 0.05
                if t.inflight:  # everything it may have lost, in original order, first
                    batch = list(t.inflight.values())
                    if not first:
                        self.stats["resent"] += len(batch)
                        m_resent.inc(len(batch))
                    self._send(t, batch)
                return
            if error is not None or incarnation != t.incarnation:
                self._start_recovery(t, f"{kind}: {error or 'incarnation changed'}")

    def _forget_idle_targets(self, now: float) -> None:
        """Dedicated targets with nothing in flight and long idle free their cap slot."""
        if self.c.mode != "dedicated":
            return
        horizon = max(self.c.idle_lifetime_s, 1.0) * 2
        for key, t in list(self.targets.items()):
            if t.dedicated and not t.inflight and now - t.last_used_s > horizon:
                del self.targets[key]
                for user in [u for u, k in self._placement.items() if k == key]:
                    del self._placement[user]

    # ------------------------------------------------------------ completions

    def complete(self, done: Iterable[tuple[str, int, int]]) -> int:
        n = 0
        with self._lock:
            for tpo in done:
                key = self._where.pop(tpo, None)
                if key is not None:
                    t = self.targets.get(key)
                    if t is not None:
                        t.inflight.pop(tpo, None)
                if self.table.done(*tpo):
                    n += 1
            self.policy.record_done(n)
            self.stats["completed"] += n
        return n

    def _backpressure(self) -> None:
        if self.consumer is None:
            return
        inflight = len(self._where)
        m_inflight.set(inflight, consumer=self.name)
        cap = self.c.max_inflight_per_consumer
        try:
            if inflight >= cap or (self._paused and inflight > cap // 2):
                # idempotent; re-applied so partitions assigned while paused stay paused
                self.consumer.pause(self.consumer.assignment())
                self._paused = True
            elif self._paused:
                self.consumer.resume(self.consumer.assignment())
                self._paused = False
        except KafkaException as exc:
            log.warning("consumer.pause_failed", error=str(exc))

    # ------------------------------------------------------------ commits

    def _commit(self, sync: bool, only: set[tuple[str, int]] | None = None) -> None:
        if self.consumer is None:
            return
        self._last_commit_s = time.monotonic()
        with self._lock:
            offsets = self.table.pending_commits()
            if only is not None:
                offsets = {k: v for k, v in offsets.items() if k in only}
            if not offsets:
                self.policy.committed(time.monotonic())
                return
            self.table.mark_committed(offsets)
            self.policy.committed(time.monotonic())
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if sync:
                self.consumer.commit(offsets=tps, asynchronous=False)
            else:
                self.consumer.commit(offsets=tps, asynchronous=True)
            self.stats["commits"] += 1
            m_commits.inc()
        except KafkaException as exc:
            log.warning("consumer.commit_failed", error=str(exc))
            with self._lock:
                for key in offsets:
                    mark = self.table._marks.get(key)
                    if mark is not None:
                        mark.committed = None
            return
        for tp in tps:
            try:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0:
                    m_lag.set(max(0, high - tp.offset), partition=str(tp.partition))
            except KafkaException:
                pass

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        if err is None:
            return
        log.warning("consumer.commit_error", error=str(err))
        with self._lock:  # ask again at the next commit
            for tp in partitions:
                mark = self.table._marks.get((tp.topic, tp.partition))
                if mark is not None:
                    mark.committed = None

    # ------------------------------------------------------------ rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats["rebalances"] += 1
        m_rebalances.inc()
        with self._lock:
            for tp in partitions:
                self.table.drop(tp.topic, tp.partition)
                self._assigned.add((tp.topic, tp.partition))
        log.info(
            "consumer.assigned", consumer=self.name, partitions=[p.partition for p in partitions]
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats["rebalances"] += 1
        m_rebalances.inc()
        tps = {(tp.topic, tp.partition) for tp in partitions}
        with self._lock:
            self._revoking |= tps
        deadline = time.monotonic() + self.c.revoke_wait_s
        while time.monotonic() < deadline:
            with self._lock:
                left = sum(self.table.inflight(t, p) for t, p in tps)
            if left == 0:
                break
            self._service()
            time.sleep(0.01)
        self._commit(sync=True, only=tps)
        self._release(tps)
        log.info("consumer.revoked", consumer=self.name, partitions=sorted(p for _, p in tps))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats["rebalances"] += 1
        m_rebalances.inc()
        self._release({(tp.topic, tp.partition) for tp in partitions})
        log.warning(
            "consumer.lost", consumer=self.name, partitions=[p.partition for p in partitions]
        )

    def _release(self, tps: set[tuple[str, int]]) -> None:
        with self._lock:
            for tpo in [k for k in self._where if (k[0], k[1]) in tps]:
                key = self._where.pop(tpo)
                target = self.targets.get(key)
                if target is not None:
                    target.inflight.pop(tpo, None)
            for topic, p in tps:
                self.table.drop(topic, p)
            self._assigned -= tps
            self._revoking -= tps

    # ------------------------------------------------------------ control

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._where:
                    return
            self._service()
            time.sleep(0.01)

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        self._stop.set()
        self._stopped.wait(timeout_s)
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "consumer": self.name,
                "pid": os.getpid(),
                "assigned": sorted(p for _, p in self._assigned),
                "inflight": len(self._where),
                "paused": self._paused,
                "targets": {
                    k: {"state": t.state, "inflight": len(t.inflight), "dedicated": t.dedicated}
                    for k, t in self.targets.items()
                },
                "committed": {f"{t}:{p}": m.committed for (t, p), m in self.table._marks.items()},
                "stats": dict(self.stats),
                "first_consumed_unix_s": self.first_consumed_unix_s,
                "error": self.error,
                "running": not self._stopped.is_set(),
            }


def _routing_headers(headers: Any) -> tuple[str, int, bool, bool]:
    """(msg_id, retry_count, is_retry, is_drain) in one pass; the DLQ helpers only for a
    retry."""
    msg_id: str | None = None
    retry = False
    drain = False
    for name, value in headers or ():
        if name == "msg_id":
            if msg_id is None:  # the first one, as header_value
                msg_id = value.decode() if isinstance(value, bytes) else str(value)
        elif name == "retry_from_dlq":
            retry = True
        elif name == DRAIN_HEADER:
            drain = True
    if not retry:
        return msg_id or "", 0, False, False
    dlq_retry = is_dlq_retry(headers)
    return msg_id or "", retry_count_of(headers), dlq_retry, drain and dlq_retry


def _is(error: BaseException, cls: type[BaseException]) -> bool:
    cause = getattr(error, "cause", None)
    return isinstance(error, cls) or isinstance(cause, cls) or cls.__name__ in str(error)


@ray.remote(num_cpus=0, max_restarts=-1)
class PartitionConsumer:
    """Threaded actor: the poll loop runs in its own thread, `complete` in Ray's pool."""

    def __init__(self, settings: Settings, index: int) -> None:
        configure_logging(settings.obs.log_level, settings.obs.log_format)
        self.core = PartitionConsumerCore(settings, index, crash_on_error=True)
        tune_gc()

    def complete(self, done: PackedDone) -> int:
        """`done` = consume.types.pack_done(completed (topic, partition, offset)s)."""
        return self.core.complete(unpack_done(done))

    def snapshot(self) -> dict[str, Any]:
        return self.core.snapshot()

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        return self.core.stop(timeout_s)

    def pid(self) -> int:
        return os.getpid()

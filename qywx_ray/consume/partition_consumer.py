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

The decisions are made by a pure `tracker.ConsumerTracker` (ownership, watermarks,
in-flight per target, recoveries, commits); this module is the IO around it: Kafka,
Ray calls, and in dedicated mode the placement shared through Redis (placement.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import ray
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from redis.exceptions import RedisError

from qywx_ray.consume.dedicated_pool import PoolKeeper, RayStarter, RedisPoolStore, run_keeper
from qywx_ray.consume.hosts import (
    UserActorDying,
    actor_exists,
    get_or_create_user_actor,
    host_index,
    host_name,
    user_actor_name,
)
from qywx_ray.consume.placement import (
    Placement,
    RedisPlacementStore,
    Want,
    is_dedicated,
    placement_prefix,
)
from qywx_ray.consume.tracker import Call, ConsumerTracker, Due, Forgotten, Send
from qywx_ray.consume.types import (
    DRAIN_HEADER,
    Delivery,
    PackedDone,
    pack_deliveries,
    unpack_done,
)
from qywx_ray.dlq.strategies import is_dlq_retry, retry_count_of
from qywx_ray.envelope import header_value
from qywx_ray.kafka.config import consumer_config
from qywx_ray.obs.logging import configure_logging, get_logger
from qywx_ray.obs.metrics import counter, gauge
from qywx_ray.process_tuning import gc_pauses, tune_gc
from qywx_ray.retry import capped_exponential, retry_sync
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_redis

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


class PartitionConsumerCore:
    """The IO shell around a `ConsumerTracker`; runs its own poll thread.

    Every decision (what to dispatch, to whom, what to re-send, what to commit) is the
    tracker's; this class feeds it Kafka records, rebalance callbacks, Ray answers and
    completions, and executes what it returns. `_lock` guards the tracker: completions
    arrive on Ray's threads while the poll thread runs.
    """

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
        self.dedicated_mode = self.c.mode == "dedicated"
        self.tracker = ConsumerTracker(
            commit_every_messages=self.c.commit_every_messages,
            commit_interval_s=self.c.commit_interval_s,
            health_interval_s=self.c.health_check_interval_s,
            forget_after_s=max(self.c.idle_lifetime_s, 1.0) * 2 if self.dedicated_mode else None,
        )
        self._handles: dict[str, Any] = {}  # target key -> Ray actor handle
        self._refs: dict[Any, tuple[str, str, int]] = {}  # ref -> (target, kind, epoch)
        self._paused = False
        self._host_names = [host_name(settings, i) for i in range(self.c.num_hosts)]
        # Dedicated mode: the shared placement (poll thread only) and the users it may
        # hand back once their dedicated actor has ended: user -> (key, partition).
        self._placement: Placement | None = None
        self._to_release: dict[str, tuple[str, tuple[str, int]]] = {}
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
        # Dedicated mode: consumer 0 keeps the warm pool of spare user actors
        # (dedicated_pool.py) on its own thread: starting actors never stalls polling.
        self.pool: PoolKeeper | None = None
        if self.dedicated_mode and self.c.dedicated_pool_size > 0 and index == 0:
            self.pool = PoolKeeper(
                RedisPoolStore(make_redis(settings.redis), placement_prefix(self.c.name_prefix)),
                RayStarter(settings),
                name_prefix=self.c.name_prefix,
                size=self.c.dedicated_pool_size,
                at_once=self.c.dedicated_pool_starts_at_once,
            )
            threading.Thread(
                target=run_keeper, args=(self.pool, self._stop), name="dedicated-pool", daemon=True
            ).start()

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
                batch = self._poll(kc.poll_batch_max, kc.poll_timeout_s)
                if batch:
                    self._dispatch(batch)
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

    def _poll(self, max_n: int, timeout_s: float) -> list[tuple[int, Any]]:
        """Wait up to timeout_s for the FIRST record, then take what is queued, lingering
        only until `poll_linger_ms` after the previous batch: a record after a quiet spell
        leaves at once (a cold user's first message is not held back), while under load
        batches leave at most every `poll_linger_ms` and grow with the rate (fewer Ray
        calls and Redis round trips per message).

        Each record comes with the tracker's serial read right after the call that
        returned it: a rebalance served inside `consume()` must not let the record that
        `poll()` returned before it through (it belongs to the earlier assignment)."""
        assert self.consumer is not None
        first = self.consumer.poll(timeout_s)
        if first is None:
            return []
        at_first = self.tracker.serial
        if max_n <= 1:
            return [(at_first, first)]
        wait_s = self._last_batch_s + self.c.poll_linger_ms / 1000.0 - time.monotonic()
        rest = self.consumer.consume(max_n - 1, max(0.0, wait_s))
        self._last_batch_s = time.monotonic()
        at_rest = self.tracker.serial
        return [(at_first, first), *((at_rest, m) for m in rest)]

    def _dispatch(self, batch: list[tuple[int, Any]]) -> None:
        now = time.monotonic()
        if self.first_consumed_unix_s is None:
            self.first_consumed_unix_s = time.time()
        wall_ms = int(time.time() * 1000)
        deliveries: list[Delivery] = []
        fetched_at: list[int] = []
        firsts: dict[str, tuple[bytes, Any]] = {}  # dedicated mode: user -> its first record
        for serial, m in batch:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer.record_error", error=str(err))
                continue
            key = (m.key() or b"").decode("utf-8", "replace")
            headers = m.headers()
            ts = m.timestamp()[1]
            value = m.value() or b""
            msg_id, retry_count, is_retry, is_drain = _routing_headers(headers)
            d = Delivery(
                m.topic(),
                m.partition(),
                m.offset(),
                ts if ts > 0 else wall_ms,
                key,
                value,
                msg_id,
                self.instance,
                retry_count,
                is_retry,
                is_drain,
            )
            deliveries.append(d)
            fetched_at.append(serial)
            if self.dedicated_mode and key not in firsts:
                firsts[key] = (value, headers)
        route = self._route_hosted
        if self.dedicated_mode:
            placement = self._resolve_placements(deliveries, fetched_at, firsts)
            if placement is None:
                return  # stopping: nothing was tracked, the next owner reads them again
            route = placement.route
        with self._lock:
            out = self.tracker.polled(deliveries, route, now, fetched_at)
            self.stats["consumed"] += len(batch)
            m_consumed.inc(len(batch))
            for partition, n in out.per_partition.items():
                m_partition.inc(n, partition=str(partition))
            for send in out.sends:
                self._send(send)
            self._backpressure()

    def _route_hosted(self, user: str) -> str:
        return self._host_names[host_index(user, self.c.num_hosts)]

    def _resolve_placements(
        self,
        deliveries: list[Delivery],
        fetched_at: list[int],
        firsts: dict[str, tuple[bytes, Any]],
    ) -> Placement | None:
        """Dedicated mode: make sure every user of the batch that will be dispatched has
        its shared placement (one store round trip for the new ones). Retries while the
        store is unreachable (servicing completions and commits meanwhile); None if the
        consumer is stopping."""
        placement = self._placement_view()
        with self._lock:  # in record order: the first user to come gets the free slot
            users = {
                d.key: None
                for d, at in zip(deliveries, fetched_at, strict=True)
                if not placement.known(d.key) and self.tracker.accepts((d.topic, d.partition), at)
            }
        if not users:
            return placement
        wants = [
            Want(u, user_actor_name(self._open_kfid(*firsts[u]), u), self._route_hosted(u))
            for u in users
        ]

        def on_retry(exc: BaseException, _attempt: int, _delay_s: float) -> None:
            log.warning("consumer.placement_unavailable", error=str(exc), users=len(wants))

        def serve_while_waiting(delay_s: float) -> None:
            """Back off without going deaf: keep serving the poll loop meanwhile."""
            deadline = time.monotonic() + delay_s
            while time.monotonic() < deadline:
                self._service()
                time.sleep(0.01)

        try:
            retry_sync(
                lambda: placement.resolve(wants),
                retry_on=(RedisError,),
                wait=capped_exponential(0.05, 2.0),
                on_retry=on_retry,
                until=self._stop.is_set,
                sleep=serve_while_waiting,
            )
        except RedisError as exc:
            if not self._stop.is_set():
                raise  # from the poll loop served meanwhile, not the resolve: crash-only
            # stopping: the batch is left for the next owner
            log.warning("consumer.placement_unavailable", error=str(exc), users=len(wants))
            return None
        return placement

    def _placement_view(self) -> Placement:
        if self._placement is None:
            store = RedisPlacementStore(
                make_redis(self.settings.redis), placement_prefix(self.c.name_prefix)
            )
            self._placement = Placement(store, self.c.max_dedicated_actors)
        return self._placement

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

    def _send(self, send: Send) -> None:
        handle = self._handles[send.key]
        if send.resend:
            self.stats["resent"] += len(send.deliveries)
            m_resent.inc(len(send.deliveries))
        packed = pack_deliveries(send.deliveries)
        ref = handle.deliver.options(enable_task_events=False).remote(packed, send.incarnation)
        self._refs[ref] = (send.key, "deliver", send.epoch)

    def _try_recover(self, call: Call, now: float) -> None:
        try:
            handle = self._handles.get(call.key)
            if handle is None or call.dedicated:
                if call.dedicated:
                    handle = get_or_create_user_actor(self.settings, call.key)
                else:
                    handle = ray.get_actor(call.key, namespace=self.c.namespace)
                self._handles[call.key] = handle
            ref = handle.incarnation_id.remote()
        except Exception as exc:  # noqa: BLE001 - name not registered yet / GCS hiccup
            log.warning("consumer.recovery_retry", target=call.key, error=str(exc))
            self.tracker.recovery_failed(call.key, call.epoch, now)
            return
        self._refs[ref] = (call.key, "recover", call.epoch)

    def _service(self) -> None:
        """Check finished Ray calls, recover targets, probe health, commit, pace fetching."""
        now = time.monotonic()
        with self._lock:
            due = self._act_on_due(now)
            refs = list(self._refs)
        if due.forgotten_users or (due.health_tick and self._to_release):
            self._release_placements(due.forgotten_users)
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                self._on_ref(ref)
        with self._lock:
            offsets = self.tracker.commit_due(now)
        if offsets:
            self._execute_commit(offsets, sync=False)
        if self._paused:  # completions arrive on other threads; resume from here
            with self._lock:
                self._backpressure()

    def _act_on_due(self, now: float) -> Due:
        """Under the lock: start what the tracker says is due (recoveries, health probes),
        forget targets it forgot, drop calls it no longer listens to; return its answer."""
        due = self.tracker.due(now)
        for call in due.recover:
            self._try_recover(call, now)
        for call in due.probe:
            ref = self._handles[call.key].incarnation_id.remote()
            self._refs[ref] = (call.key, "health", call.epoch)
        for key in due.forgotten_targets:
            self._handles.pop(key, None)
        if due.health_tick:  # calls we stopped listening to (abandoned, superseded)
            for ref, (key, _kind, epoch) in list(self._refs.items()):
                if not self.tracker.is_current(key, epoch):
                    del self._refs[ref]
        return due

    def _on_ref(self, ref: Any) -> None:
        with self._lock:
            entry = self._refs.pop(ref, None)
            if entry is None:
                return
            key, kind, epoch = entry
            try:
                incarnation = ray.get(ref, timeout=0)
                error = None
            except (RayError, GetTimeoutError) as exc:
                incarnation, error = None, exc
            if kind == "recover":
                if error is not None:
                    self.tracker.recovery_failed(key, epoch, time.monotonic())
                    if not (isinstance(error, RayActorError) or _is(error, UserActorDying)):
                        log.warning("consumer.recovery_failed", target=key, error=str(error))
                    return
                send = self.tracker.recovered(key, epoch, incarnation, time.monotonic())
                if send is not None:  # everything it may have lost, in original order, first
                    self._send(send)
                return
            probe = kind == "health"
            if error is not None:
                started = self.tracker.target_failed(key, epoch, probe=probe)
            else:
                started = self.tracker.incarnation_seen(key, epoch, incarnation, probe=probe)
            if started:
                t = self.tracker.targets[key]
                log.warning(
                    "consumer.target_recovering",
                    target=key,
                    why=f"{kind}: {error or 'incarnation changed'}",
                    inflight=len(t.inflight),
                )
                self.stats["recoveries"] += 1

    def _release_placements(self, forgotten: list[Forgotten]) -> None:
        """Hand back the placements of users this consumer forgot (idle, nothing in
        flight here), conservatively: a user placed on its own actor only once that actor
        has ended, never a user seen again since, nor one whose partition moved on."""
        if self._placement is None:
            return
        self._placement.forget(f.user for f in forgotten)
        for f in forgotten:
            self._to_release[f.user] = (f.key, f.tp)
        ready: list[tuple[str, str]] = []
        for user, (key, tp) in list(self._to_release.items()):
            with self._lock:
                back_or_moved = self.tracker.knows_user(user) or not self.tracker.owns(tp)
            if back_or_moved:
                del self._to_release[user]
            elif not is_dedicated(key) or not self._actor_alive(key):
                ready.append((user, key))
        if not ready:
            return
        try:
            self._placement.store.release(ready)
        except RedisError as exc:
            log.warning("consumer.placement_release_failed", error=str(exc), users=len(ready))
            return
        for user, _key in ready:
            self._to_release.pop(user, None)

    def _actor_alive(self, name: str) -> bool:
        return actor_exists(name, self.c.namespace)

    # ------------------------------------------------------------ completions

    def complete(self, done: Iterable[tuple[str, int, int]]) -> int:
        with self._lock:
            n = self.tracker.completed(done)
            self.stats["completed"] += n
        return n

    def _backpressure(self) -> None:
        if self.consumer is None:
            return
        inflight = self.tracker.inflight
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
        with self._lock:
            offsets = self.tracker.commit_now(time.monotonic(), only)
        if offsets:
            self._execute_commit(offsets, sync)

    def _execute_commit(self, offsets: dict[tuple[str, int], int], sync: bool) -> None:
        if self.consumer is None:
            return
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
                self.tracker.commit_failed(offsets)
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
            self.tracker.commit_failed((tp.topic, tp.partition) for tp in partitions)

    # ------------------------------------------------------------ rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats["rebalances"] += 1
        m_rebalances.inc()
        with self._lock:
            self.tracker.assigned((tp.topic, tp.partition) for tp in partitions)
        self._placement_changed()
        log.info(
            "consumer.assigned", consumer=self.name, partitions=[p.partition for p in partitions]
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats["rebalances"] += 1
        m_rebalances.inc()
        tps = {(tp.topic, tp.partition) for tp in partitions}
        with self._lock:
            self.tracker.revoking(tps)
        deadline = time.monotonic() + self.c.revoke_wait_s
        while time.monotonic() < deadline:
            with self._lock:
                left = self.tracker.inflight_in(tps)
            if left == 0:
                break
            self._service()
            time.sleep(0.01)
        self._commit(sync=True, only=tps)
        with self._lock:
            self.tracker.revoked(tps)
        self._placement_changed()
        log.info("consumer.revoked", consumer=self.name, partitions=sorted(p for _, p in tps))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.stats["rebalances"] += 1
        m_rebalances.inc()
        with self._lock:
            self.tracker.lost({(tp.topic, tp.partition) for tp in partitions})
        self._placement_changed()
        log.warning(
            "consumer.lost", consumer=self.name, partitions=[p.partition for p in partitions]
        )

    def _placement_changed(self) -> None:
        """Users whose partition moved may be placed anew by their next owner: read the
        shared record again rather than trust this consumer's cache."""
        if self._placement is not None:
            self._placement.clear()

    # ------------------------------------------------------------ control

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self.tracker.inflight:
                    return
            self._service()
            time.sleep(0.01)

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        self._stop.set()
        self._stopped.wait(timeout_s)
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            tr = self.tracker
            return {
                "consumer": self.name,
                "pid": os.getpid(),
                "assigned": sorted(p for _, p in tr.assigned_partitions()),
                "inflight": tr.inflight,
                "paused": self._paused,
                "targets": {
                    k: {"state": t.state, "inflight": len(t.inflight), "dedicated": t.dedicated}
                    for k, t in tr.targets.items()
                },
                "committed": {f"{t}:{p}": c for (t, p), c in tr.committed().items()},
                "stats": dict(self.stats),
                "first_consumed_unix_s": self.first_consumed_unix_s,
                "error": self.error,
                "running": not self._stopped.is_set(),
                "stopping": self._stop.is_set(),  # stop() called: draining, then commit
                "gc": gc_pauses.stats(),  # this process's collector pauses (tune_gc)
                "pool": self.pool.report() if self.pool is not None else None,
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

    def where(self) -> dict[str, Any]:
        from qywx_ray.placement import where

        return where()

    def __repr__(self) -> str:
        # Ray shows this in the dashboard and log prefixes (taken once, after __init__).
        assigned = sorted(p for _, p in self.core.tracker.assigned_partitions())
        return f"PartitionConsumer({self.core.name} partitions={assigned})"

"""The original design's load profiles end to end: simulator → callback → sync → Kafka →
user actors → handler, on one LocalPipeline per profile.

normal = 1,000 users × 2 msg/min; peak = 100 users × 60 msg/min; attack = 10 users ×
1,000 msg/min on top of normal. Per profile: offered and processed msg/s, latency from
message creation at the simulator (`sim_created_ms`) to handler start (p50/p99/max),
mailboxes and Ray worker processes live, RSS and CPU per process group, and the audit
against the simulator's ground truth (lost / reordered / duplicated side effects, dead
letters by reason). For attack: normal users' p99 with vs without attackers.
Also home of the helpers bench_stress.py shares (pipeline start/stop, windows, stamps).
Never touches the shared development services: its Redis is its own, its Kafka its own
unless QYWX_BENCH_BOOTSTRAP is given (then only its own topics, deleted at the end).

  python -m bench.bench_profiles [--quick] [--duration-s 120] [--profiles normal attack]
"""

# bench-timeout-s: full=1500 quick=600

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.output import emit, log
from bench.procs import (
    ProcSample,
    cpu_by_group,
    group_samples,
    pid_listening_on,
    rss_by_group,
    scan_processes,
)
from bench.runs import BOOTSTRAP_ENV, QUICK_ENV, default_runs, quick_mode
from bench.services import exit_on_sigterm
from bench.stats import percentiles

if TYPE_CHECKING:  # the pipeline imports Ray lazily; the pure helpers never need it
    from qywx_ray.devstack.pipeline import LocalPipeline, Stamp

ATTACKER_PREFIX = "wmSIMATTACK"
NORMAL_PREFIX = "wmSIMUSER"
STAMPED_HANDLER = "qywx_ray.devstack.pipeline:timed_recording_handler"
NOOP_STAMPED_HANDLER = "qywx_ray.devstack.pipeline:timed_noop_handler"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    name: str
    users: int
    rate_per_min: float  # per user
    attackers: int = 0
    attacker_rate_per_min: float = 0.0
    vip: bool = False  # users in the default config's vip group (20 per 10 s) instead of default

    @property
    def offered_msg_s(self) -> float:
        return (self.users * self.rate_per_min + self.attackers * self.attacker_rate_per_min) / 60

    def sim_args(self, seed: int = 7) -> list[str]:
        return [
            "--users",
            str(self.users),
            "--rate",
            f"{self.rate_per_min}/min",
            "--attackers",
            str(self.attackers),
            "--attacker-rate",
            f"{self.attacker_rate_per_min}/min",
            "--mix",
            "text=0.9,image=0.1",
            "--stamp-created-ms",
            "--seed",
            str(seed),
        ]

    def user_groups(self) -> dict[str, str]:
        """protect.user_groups for this profile (the simulator's user ids, see Population)."""
        if not self.vip:
            return {}
        return {f"{NORMAL_PREFIX}{i:08d}": "vip" for i in range(self.users)}


# A peak-hour customer chats at 60/min: 10 per 10 s, over the default rule (5 per
# 10 s, blocked after 3 violations). Peak users are legitimate, so they get the
# vip rule (20 per 10 s); attackers keep the default rule and must be stopped by it.
PROFILES: dict[str, Profile] = {
    "normal": Profile("normal", users=1000, rate_per_min=2),
    "peak": Profile("peak", users=100, rate_per_min=60, vip=True),
    "attack": Profile(
        "attack", users=1000, rate_per_min=2, attackers=10, attacker_rate_per_min=1000
    ),
}


# ---------------------------------------------------------------------------------------
# Pure: latency windows, stamp audits


def is_attacker(user: str) -> bool:
    return user.startswith(ATTACKER_PREFIX)


@dataclass
class LatencySummary:
    n: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms}


def summarize_latencies(latencies_ms: Sequence[float]) -> LatencySummary:
    if not latencies_ms:
        return LatencySummary()
    q = percentiles(latencies_ms, [50, 99, 100])
    return LatencySummary(len(latencies_ms), q[50], q[99], q[100])


@dataclass
class WindowStats:
    """What a measurement window [t0_ms, t1_ms) saw in the handler stamps."""

    duration_s: float
    processed: int  # first handler calls that started inside the window
    calls: int  # every handler call that started inside the window (retries, replays)
    latency: dict[str, LatencySummary] = field(default_factory=dict)  # all/normal/attackers

    @property
    def processed_msg_s(self) -> float:
        return self.processed / self.duration_s if self.duration_s > 0 else 0.0


def window_stats(
    stamps: Iterable[Stamp],
    t0_ms: int,
    t1_ms: int,
    attacker: Callable[[str], bool] = is_attacker,
    via_dlq: Collection[str] = frozenset(),
) -> WindowStats:
    """Latency (creation → first handler start) of the messages created in the window,
    split normal / attackers, and throughput of first handler starts in the window.

    Messages in `via_dlq` (dead-lettered once, e.g. rate-limited, and handled when the
    DLQ retried them, by design a minute or more later) are kept apart in `via_dlq`:
    `all`, `normal` and `attackers` are the direct path."""
    if t1_ms <= t0_ms:
        raise ValueError("empty window")
    seen: set[str] = set()
    processed = calls = 0
    lat: dict[str, list[float]] = {"all": [], "normal": [], "attackers": [], "via_dlq": []}
    for s in stamps:
        inside = t0_ms <= s.start_ms < t1_ms
        calls += inside
        if s.message_id in seen:
            continue
        seen.add(s.message_id)
        processed += inside
        if s.created_ms >= 0 and t0_ms <= s.created_ms < t1_ms:
            ms = float(max(0, s.start_ms - s.created_ms))
            if s.message_id in via_dlq:
                lat["via_dlq"].append(ms)
                continue
            lat["all"].append(ms)
            lat["attackers" if attacker(s.user) else "normal"].append(ms)
    return WindowStats(
        duration_s=(t1_ms - t0_ms) / 1000.0,
        processed=processed,
        calls=calls,
        latency={k: summarize_latencies(v) for k, v in lat.items()},
    )


@dataclass
class StampAudit:
    messages: int
    processed: int
    dead_lettered: int
    unaccounted: int  # neither handled nor dead-lettered (lost, or still in the backlog)
    reordered_users: int
    duplicated_calls: int  # handler called more than once for one message id

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def audit_stamps(
    truth: dict[str, dict[str, list[str]]], stamps: Sequence[Stamp], dead: set[str]
) -> StampAudit:
    """The drill audit, from the handler stamps (for handlers without recorded side
    effects): every message handled once per user order, or dead-lettered."""
    first: dict[str, list[str]] = {}
    seen: set[str] = set()
    dup = 0
    for s in stamps:
        if s.message_id in seen:
            dup += 1
            continue
        seen.add(s.message_id)
        first.setdefault(s.user, []).append(s.message_id)
    messages = unaccounted = dead_n = reordered = 0
    for users in truth.values():
        for user, ids in users.items():
            messages += len(ids)
            got = first.get(user, [])
            got_set = set(got)
            unaccounted += sum(1 for m in ids if m not in got_set and m not in dead)
            dead_n += sum(1 for m in ids if m in dead and m not in got_set)
            # A dead-lettered message may be retried later, out of line by design.
            straight = [m for m in got if m not in dead]
            straight_set = set(straight)
            if straight != [m for m in ids if m in straight_set]:
                reordered += 1
    return StampAudit(messages, len(seen), dead_n, unaccounted, reordered, dup)


def letters_by_reason(letters: Iterable[bytes | str]) -> dict[str, int]:
    """Count indexed dead letters (JSON bodies) by failure_reason."""
    out: dict[str, int] = {}
    for body in letters:
        try:
            reason = str(json.loads(body).get("failure_reason", "unknown"))
        except (ValueError, AttributeError):
            reason = "unparsable"
        out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------
# Glue: one Ray, one Kafka, one LocalPipeline per case


@dataclass
class Stack:
    """Ray + Kafka shared by every case of a bench process."""

    workdir: Path
    bootstrap: str
    kafka_pids: list[int]
    external: bool
    cluster: Any = None
    topics: list[str] = field(default_factory=list)


@contextlib.contextmanager
def bench_stack(num_cpus: int = 4) -> Iterator[Stack]:
    """A fresh local Ray and a Kafka (own, or QYWX_BENCH_BOOTSTRAP's); all stopped after."""
    import ray

    from qywx_ray.devstack.kafka import KafkaCluster
    from qywx_ray.devstack.procs import free_port

    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="qywx-bench-pipe-"))
    stack: Stack | None = None
    try:
        bootstrap = os.environ.get(BOOTSTRAP_ENV, "")
        if bootstrap:
            port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
            pid = pid_listening_on(port)
            stack = Stack(workdir, bootstrap, [pid] if pid else [], external=True)
        else:
            log("bench: starting a throwaway Kafka")
            cluster = KafkaCluster(
                workdir / "kafka", brokers=1, ports=[free_port()], heap_mb=512
            ).start()
            stack = Stack(
                workdir, cluster.bootstrap_servers, cluster.pids(), external=False, cluster=cluster
            )
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            namespace=f"bench-{uuid.uuid4().hex[:6]}",
            configure_logging=False,
        )
        yield stack
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if stack is not None:
            if stack.external and stack.topics:
                from bench.services import _delete_topics
                from qywx_ray.settings import load_settings

                k = load_settings(
                    profile="development",
                    overrides={"kafka": {"bootstrap_servers": stack.bootstrap}},
                ).kafka
                _delete_topics(k, stack.topics)
            if stack.cluster is not None:
                stack.cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def pipeline_overrides(
    tag: str, handler: str, user_groups: dict[str, str] | None = None, protect: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kafka": {
            "main_topic": {"name": f"bench-pipe-main-{tag}"},
            "dlq_topic": {"name": f"bench-pipe-dlq-{tag}"},
        },
        "consume": {"handler": handler},
        "dlq": {"recovery_actor_name": f"bench-rec-{tag}"},
        "protect": {"enabled": protect},
    }
    if user_groups:
        out["protect"]["user_groups"] = user_groups
    return out


@contextlib.contextmanager
def running_pipeline(
    stack: Stack, name: str, sim_args: list[str], overrides: dict[str, Any]
) -> Iterator[LocalPipeline]:
    """A LocalPipeline on the stack's Kafka with its own Redis; stopped (by PID) after."""
    import ray
    from ray import serve

    from qywx_ray.devstack.pipeline import LocalPipeline

    tag = overrides["kafka"]["main_topic"]["name"].rsplit("-", 1)[1]
    stack.topics += [
        overrides["kafka"]["main_topic"]["name"],
        overrides["kafka"]["dlq_topic"]["name"],
    ]
    p = LocalPipeline(
        stack.workdir / f"{name}-{tag}",
        bootstrap=stack.bootstrap,
        overrides=overrides,
        sim_args=sim_args,
    )
    try:
        started = time.monotonic()
        p.start()
        log(f"bench: pipeline {name} up in {time.monotonic() - started:.1f}s")
        yield p
    finally:
        p.stop()
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(overrides["dlq"]["recovery_actor_name"]), no_restart=True)
        with contextlib.suppress(Exception):
            serve.shutdown()


def sim_post(p: LocalPipeline, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    assert p.sim is not None
    r = httpx.post(f"{p.sim.base_url}{path}", json=body or {}, timeout=30)
    r.raise_for_status()
    return dict(r.json())


def sim_mark(p: LocalPipeline) -> dict[str, int]:
    """The simulator's message count and clock, read atomically (window boundaries)."""
    import httpx

    assert p.sim is not None
    r = httpx.get(f"{p.sim.base_url}/sim/population/mark", timeout=30)
    r.raise_for_status()
    return {k: int(v) for k, v in r.json().items()}


def stamp_count(p: LocalPipeline) -> int:
    from qywx_ray.devstack.pipeline import STAMP_KEY

    return int(p.redis_client().llen(STAMP_KEY))


def wait_first_stamps(p: LocalPipeline, timeout_s: float = 120.0) -> float:
    """Seconds until the first message reached a handler (the pipeline is live)."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if stamp_count(p) > 0:
            return time.monotonic() - started
        time.sleep(0.5)
    raise TimeoutError(f"no message reached a handler within {timeout_s:.0f}s")


def host_snapshots(p: LocalPipeline) -> list[dict[str, Any]]:
    import ray

    return list(ray.get([h.snapshot.remote() for h in p.consume.hosts], timeout=30))


def host_view(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Mailboxes live (hosted user actors) and their queues, from the hosts' snapshots."""
    return {
        "mailboxes": sum(int(s.get("users", 0)) for s in snaps),
        "pending": sum(int(s.get("pending", 0)) for s in snaps),
        "hosts": len(snaps),
    }


def ray_worker_count(samples: Iterable[ProcSample]) -> int:
    return sum(1 for s in samples if s.cmdline.startswith("ray::") and "IDLE" not in s.cmdline)


@dataclass
class Window:
    t0_ms: int
    t1_ms: int
    offered: int  # messages the simulator created in the window
    lag_start: int  # consume backlog: on the main topic, not committed by the group
    lag_end: int
    ingest_backlog_start: int  # created at the simulator, not yet in Kafka
    ingest_backlog_end: int
    cpu: dict[str, float]
    rss: dict[str, int]
    ray_workers: int
    hosts: dict[str, Any]
    scan_before: list[ProcSample]
    scan_after: list[ProcSample]
    groups: dict[int, str]
    gc: dict[str, dict[str, float]] = field(default_factory=dict)  # gc_delta by group
    redis_bg: dict[str, Any] = field(default_factory=dict)  # redis_background_delta

    @property
    def duration_s(self) -> float:
        return (self.t1_ms - self.t0_ms) / 1000.0

    @property
    def offered_msg_s(self) -> float:
        return self.offered / self.duration_s


def measure_window(p: LocalPipeline, stack: Stack, duration_s: float) -> Window:
    """Run the load for `duration_s` and bracket it with /proc scans, lag and counters."""
    assert p.sim is not None
    roots = [os.getpid()]
    gc0 = gc_view(p, host_snapshots(p))
    bg0 = redis_background(p)
    scan0 = scan_processes(roots, stack.kafka_pids)
    t0 = time.time()
    mark0 = sim_mark(p)
    end0, done0 = kafka_offsets(p)
    time.sleep(duration_s)  # the measurement itself: the load runs meanwhile
    mark1 = sim_mark(p)
    end1, done1 = kafka_offsets(p)
    t1 = time.time()
    scan1 = scan_processes(roots, stack.kafka_pids)
    bg1 = redis_background(p)
    snaps = host_snapshots(p)  # one round of snapshots for the mailboxes and the pauses
    hosts = host_view(snaps)
    gc1 = gc_view(p, snaps)
    groups = group_samples([*scan0, *scan1], os.getpid())
    return Window(
        t0_ms=mark0["clock_ms"],
        t1_ms=mark1["clock_ms"],
        offered=mark1["messages"] - mark0["messages"],
        lag_start=end0 - done0,
        lag_end=end1 - done1,
        ingest_backlog_start=mark0["messages"] - end0,
        ingest_backlog_end=mark1["messages"] - end1,
        cpu=cpu_by_group(scan0, scan1, t1 - t0, groups),
        rss=rss_by_group(scan1, groups),
        ray_workers=ray_worker_count(scan1),
        hosts=hosts,
        scan_before=scan0,
        scan_after=scan1,
        groups=groups,
        gc=gc_delta(gc0, gc1, t0, t1),
        redis_bg=redis_background_delta(bg0, bg1),
    )


def redis_background(p: LocalPipeline) -> dict[str, int]:
    """Redis's background work so far (INFO persistence and stats): AOF rewrites and
    forks. A rewrite runs in a forked child that is gone before the next /proc scan, so
    its CPU is in no group's figure; the fork itself stalls Redis for
    `latest_fork_usec`, and the rewrite's cost grows with the dataset (the stamps and
    done-flags of every message handled so far)."""
    info = p.redis_client().info()
    return {
        "aof_rewrites": int(info.get("aof_rewrites", 0)),
        "forks": int(info.get("total_forks", 0)),
        "rewriting": int(info.get("aof_rewrite_in_progress", 0)),
        "latest_fork_usec": int(info.get("latest_fork_usec", 0)),
        "aof_mib": int(info.get("aof_current_size", 0)) >> 20,
        "used_mib": int(info.get("used_memory", 0)) >> 20,
        # CPU of reaped children (the rewrites), in ms: no /proc scan sees the child
        "children_cpu_ms": round(
            1000
            * (
                float(info.get("used_cpu_user_children", 0))
                + float(info.get("used_cpu_sys_children", 0))
            )
        ),
    }


def redis_background_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Rewrites and forks begun in a window, the CPU of the children that ended in it (a
    rewrite's CPU counts where it ended), whether one ran at either end, the pause of
    the window's last fork (None: no fork in it), sizes at its end."""
    forked = after["forks"] > before["forks"]
    return {
        "aof_rewrites": after["aof_rewrites"] - before["aof_rewrites"],
        "forks": after["forks"] - before["forks"],
        "children_cpu_ms": after["children_cpu_ms"] - before["children_cpu_ms"],
        "rewriting_start_end": [before["rewriting"], after["rewriting"]],
        "latest_fork_ms": round(after["latest_fork_usec"] / 1000.0, 1) if forked else None,
        "aof_mib_end": after["aof_mib"],
        "used_mib_end": after["used_mib"],
    }


def gc_view(p: LocalPipeline, hosts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The collector's record (process_tuning.GcPauses.stats) of the WeCom simulator, the
    hosts (from their snapshots) and the consumers: a pause there stops every thread of
    that process."""
    import httpx
    import ray

    assert p.sim is not None
    sim = httpx.get(f"{p.sim.base_url}/sim/stats", timeout=30).json().get("gc")
    consumers = ray.get([c.snapshot.remote() for c in p.consume.consumers], timeout=30)
    return {
        "simulator": [sim] if sim else [],
        "hosts": [s["gc"] for s in hosts if s.get("gc")],
        "consumers": [s["gc"] for s in consumers if s.get("gc")],
    }


def gc_delta(
    before: dict[str, list[dict[str, Any]]],
    after: dict[str, list[dict[str, Any]]],
    t0_s: float,
    t1_s: float,
) -> dict[str, dict[str, float]]:
    """Per group, between two gc_views (processes in the same order): collector ms and
    full (generation 2) collections between the two views, and the longest pause that
    ended inside [t0_s, t1_s] (a lower bound: only the last 64 pauses of >= LONG_PAUSE_MS
    are kept with a time)."""
    out: dict[str, dict[str, float]] = {}
    for group, rows in after.items():
        old = before.get(group, [])
        pairs = list(zip(rows, old, strict=False))
        # A process that appeared, or restarted (its counters start again at 0): no delta.
        if len(old) != len(rows) or any(sum(a["count"]) < sum(b["count"]) for a, b in pairs):
            continue
        ms = sum(sum(a["total_ms"]) - sum(b["total_ms"]) for a, b in pairs)
        full = sum(a["count"][2] - b["count"][2] for a, b in pairs)
        longest = max(
            (ms_ for a in rows for t, _gen, ms_ in a["long"] if t0_s <= t <= t1_s), default=0.0
        )
        out[group] = {"ms": round(ms, 1), "full": full, "longest_ms": longest}
    return out


def offsets_client(p: LocalPipeline) -> tuple[Any, list[Any]]:
    """A Kafka client of the consumer group (never subscribing) and the main topic's
    partitions, for `group_offsets`; the caller closes it."""
    from confluent_kafka import Consumer, TopicPartition

    assert p.settings is not None
    k = p.settings.kafka
    c = Consumer(
        {
            "bootstrap.servers": k.bootstrap_servers,
            "group.id": k.consumer.group_id,
            "enable.auto.commit": False,
        }
    )
    return c, [TopicPartition(k.main_topic.name, i) for i in range(k.main_topic.partitions)]


def group_offsets(c: Any, tps: list[Any], timeout_s: float = 10.0) -> tuple[int, int]:
    """(end offsets, committed offsets) summed over `tps`."""
    end = sum(c.get_watermark_offsets(tp, timeout=timeout_s)[1] for tp in tps)
    done = sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=timeout_s))
    return end, done


def kafka_offsets(p: LocalPipeline) -> tuple[int, int]:
    """(end offsets, committed offsets) summed over the main topic's partitions."""
    c, tps = offsets_client(p)
    try:
        return group_offsets(c, tps)
    finally:
        c.close()


def dead_letter_reasons(p: LocalPipeline) -> dict[str, int]:
    return letters_by_reason(p.redis_client().hvals("qywx:dlq:letters"))


def rss_split(rss: dict[str, int]) -> dict[str, float]:
    """RSS in MiB: Ray (GCS, raylet, every worker) vs the stack (Kafka, Redis, simulator)."""
    stack_groups = {"kafka", "redis", "simulator"}
    ray_mib = sum(v for g, v in rss.items() if g not in stack_groups and g != "bench_driver")
    stack_mib = sum(v for g, v in rss.items() if g in stack_groups)
    return {
        "ray": round(ray_mib / MIB, 1),
        "stack": round(stack_mib / MIB, 1),
        "driver": round(rss.get("bench_driver", 0) / MIB, 1),
    }


# ---------------------------------------------------------------------------------------
# The profiles bench


def run_profile(
    stack: Stack, profile: Profile, duration_s: float, warmup_s: float, drain_timeout_s: float
) -> dict[str, Any]:
    from qywx_ray.devstack.pipeline import read_stamps

    tag = uuid.uuid4().hex[:8]
    overrides = pipeline_overrides(tag, STAMPED_HANDLER, profile.user_groups())
    with running_pipeline(stack, profile.name, profile.sim_args(), overrides) as p:
        live_s = wait_first_stamps(p)
        time.sleep(warmup_s)  # let mailboxes and connections settle before measuring
        w = measure_window(p, stack, duration_s)
        sim_post(p, "/sim/population/pause")
        assert p.sim is not None
        truth = p.sim.truth()
        expected = sum(len(ids) for users in truth.values() for ids in users.values())
        drained = True
        try:
            p.wait_drained(expected, timeout_s=drain_timeout_s)
        except Exception as exc:  # report the backlog, do not hide the rest
            drained = False
            log(f"bench: {profile.name}: not drained: {exc}")
        audit = p.audit()
        reasons = dead_letter_reasons(p)
        stamps = read_stamps(p.redis_client())
        dead = {k.decode() for k in p.redis_client().hkeys("qywx:dlq:letters")}
        ws = window_stats(stamps, w.t0_ms, w.t1_ms, via_dlq=dead)
    return {
        "profile": profile.name,
        "users": profile.users,
        "rate_per_min": profile.rate_per_min,
        "attackers": profile.attackers,
        "attacker_rate_per_min": profile.attacker_rate_per_min,
        "target_msg_s": round(profile.offered_msg_s, 1),
        "offered_msg_s": round(w.offered_msg_s, 1),
        "processed_msg_s": round(ws.processed_msg_s, 1),
        "duration_s": round(w.duration_s, 1),
        "live_after_s": round(live_s, 1),
        "latency": {k: v.as_dict() for k, v in ws.latency.items()},
        "mailboxes": w.hosts["mailboxes"],
        "ray_worker_processes": w.ray_workers,
        "rss_mib": rss_split(w.rss),
        "rss_by_group_mib": {g: round(v / MIB, 1) for g, v in w.rss.items()},
        "cpu_pct_by_group": w.cpu,
        "lag_start": w.lag_start,
        "lag_end": w.lag_end,
        "ingest_backlog_start": w.ingest_backlog_start,
        "ingest_backlog_end": w.ingest_backlog_end,
        "drained": drained,
        "audit": {
            "messages": audit.messages,
            "processed": audit.processed,
            "dead_lettered": audit.dead_lettered,
            "lost": audit.lost,
            "reordered": audit.reordered_users,
            "duplicated_side_effects": audit.duplicated_side_effects,
            "ok": audit.ok,
            "details": audit.details[:5],
        },
        "dead_letters_by_reason": reasons,
    }


def emit_profile(result: dict[str, Any], run: int, baseline_normal_p99: float | None) -> None:
    name = result["profile"]
    dims = {"bench": "profiles", "case": name, "run": run, "profile": name}
    extra = {
        k: result[k] for k in ("duration_s", "lag_start", "lag_end", "drained", "live_after_s")
    }
    emit(
        **dims,
        stage="e2e",
        metric="offered",
        value=result["offered_msg_s"],
        unit="msg/s",
        extra=extra,
    )
    emit(**dims, stage="e2e", metric="processed", value=result["processed_msg_s"], unit="msg/s")
    for key in ("p50", "p99", "max"):
        value = result["latency"]["all"][f"{key}_ms"]
        if value is not None:
            emit(**dims, metric=f"latency_{key}", value=value, unit="ms")
    normal_p99 = result["latency"]["normal"]["p99_ms"]
    if normal_p99 is not None:
        emit(**dims, metric="normal_users_p99", value=normal_p99, unit="ms")
    emit(**dims, metric="mailboxes_live", value=result["mailboxes"], unit="mailboxes")
    emit(
        **dims,
        metric="ray_worker_processes",
        value=result["ray_worker_processes"],
        unit="processes",
    )
    emit(**dims, metric="rss_ray", value=result["rss_mib"]["ray"], unit="MiB")
    emit(**dims, metric="rss_stack", value=result["rss_mib"]["stack"], unit="MiB")
    audit = result["audit"]
    for key in ("lost", "reordered", "duplicated_side_effects", "dead_lettered"):
        emit(
            **dims, metric=key, value=audit[key], unit="messages" if key != "reordered" else "users"
        )
    rate_limited = sum(
        v
        for k, v in result["dead_letters_by_reason"].items()
        if k in ("rate_limited", "user_blocked")
    )
    emit(**dims, metric="rate_limited_in_dlq", value=rate_limited, unit="messages")
    summary = dict(result)
    summary["normal_p99_without_attackers_ms"] = baseline_normal_p99
    emit(kind="profile", bench="profiles", case=name, run=run, result=summary)


def main(argv: list[str] | None = None) -> int:
    quick = quick_mode()
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="≈30 s per profile")
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--duration-s", type=float, default=None, help="per profile (120; quick 30)")
    ap.add_argument("--warmup-s", type=float, default=None, help="before measuring (15; quick 8)")
    ap.add_argument("--drain-timeout-s", type=float, default=180.0)
    args = ap.parse_args(argv)
    if args.quick:
        os.environ[QUICK_ENV] = "1"
        quick = True
    duration_s = args.duration_s or (30.0 if quick else 120.0)
    warmup_s = args.warmup_s if args.warmup_s is not None else (8.0 if quick else 15.0)
    failures = 0
    # One run per profile by default (each is minutes long); QYWX_BENCH_RUNS=3 repeats
    # the whole set, so the report's medians are taken over runs as for the other benches.
    runs = default_runs(1)
    with bench_stack() as stack:
        for run in range(runs):
            baseline: float | None = None
            for name in args.profiles:
                profile = PROFILES[name]
                log(
                    f"bench: run {run} profile {name}: {profile.offered_msg_s:.0f} msg/s "
                    f"for {duration_s:.0f}s"
                )
                try:
                    result = run_profile(stack, profile, duration_s, warmup_s, args.drain_timeout_s)
                except Exception as exc:
                    failures += 1
                    log(f"bench: profile {name} failed: {exc!r}")
                    emit(kind="error", bench="profiles", case=name, run=run, error=repr(exc)[:500])
                    continue
                if name == "normal":
                    baseline = result["latency"]["normal"]["p99_ms"]
                emit_profile(result, run, baseline if name == "attack" else None)
                log(f"bench: profile {name}: {json.dumps(result)[:600]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

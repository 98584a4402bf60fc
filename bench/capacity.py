"""The capacity model of docs/capacity.md: measured per-message CPU and per-user memory in,
nodes / partitions / consumers / hosts / syncer hosts out.

`python -m bench.capacity` prints the sizing table that docs/capacity.md shows
(tests/unit/test_capacity_model.py checks that the page and this model agree). Every
input is a number measured on this repository's 2-vCPU benchmark box (slow, shared
vCPUs: a production core does at least as much), named with where it comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qywx_ray.consume.settings import ConsumeSettings

# CPU per message, µs, medians (bench/results/compare/README.md, bench/REPORT.md).
SYNCER_US = 20.3  # one syncer host process, one account, GC tuned (syncer_after_gc_*_round3)
CONSUMER_US = 15.8  # partition consumer, hosted trivial drain (REPORT.md cpu_per_msg_consumers)
HOST_US = 42.8  # user hosts, hosted trivial drain, quiet re-run at 177fa5e (compare/README)
# One encrypted callback through Serve with direct ingress: 977/s on the 2 shared vCPUs
# with wrk and the syncers on them (docs/benchmarks.md): ~1 ms, an upper bound.
CALLBACK_US = 1000.0
# Redis time per message: the rate-limit script costs 3.7 µs/msg when a batch holds 10
# messages per user, 21 µs/msg when every message is another user's (docs/benchmarks.md),
# plus done-flag writes and the admit MGET (~2 µs).
REDIS_US_BEST, REDIS_US_WORST = 6.0, 23.0
# Redis memory per done-flag (`qywx:done:{msgid}` with its TTL, 32-character msgids):
# 132.9 bytes, median of 3 runs of bench_redis_memory (2026-12-07). Redis holds one per
# message for `consume.dedup_ttl_s` (one day by default): rate x window of them.
DONE_FLAG_BYTES = 132.9
DEDUP_TTL_S: int = ConsumeSettings.model_fields["dedup_ttl_s"].default  # the default window
# Memory per live hosted user (a mailbox: state, queue, timers): 4.7 KiB idle RSS
# (bench_idle_users), 7.4 KiB with recent traffic (architecture notes); a host process
# starts at ~120 MiB RSS.
USER_KIB = 7.4
HOST_BASE_MIB = 120.0
HOST_MAX_GIB = 4.0  # keep a host's heap small enough to restart quickly after a node loss

TARGET_UTIL = 0.6  # plan at 60 % of a core: headroom for a lost node's share and bursts
NODE_VCPU, NODE_GIB = 8, 32  # cluster.yaml's worker type, m6i.2xlarge
PARTITIONS_MIN = 12  # production.yaml: the topic is created once, size it for the peak
SYNCER_MAX_MSG_S = 20_738  # one open_kfid's syncer alone, measured ceiling


@dataclass(frozen=True)
class Sizing:
    users: int
    msg_s: int
    consumers: int
    partitions: int
    hosts: int
    syncer_hosts: int
    ingress_cores: float
    pipeline_cores: float
    memory_gib: float
    nodes: int
    redis_cores: tuple[float, float]  # best, worst case: > 1 means one Redis is not enough
    redis_flags_gib: float  # the done-flags of one dedup window (DEDUP_TTL_S)


def cores(msg_s: float, us_per_msg: float) -> float:
    return msg_s * us_per_msg / 1e6 / TARGET_UTIL


def size(users: int, msg_s: int, callbacks_per_msg: float = 1.0) -> Sizing:
    """`users`: live users (spoke within `consume.idle_lifetime_s`, 3 h by default)."""
    consumers = max(1, math.ceil(cores(msg_s, CONSUMER_US)))
    memory_gib = users * USER_KIB / 2**20
    hosts_cpu = math.ceil(cores(msg_s, HOST_US))
    hosts_mem = math.ceil(memory_gib / HOST_MAX_GIB)
    hosts = max(2, hosts_cpu, hosts_mem)
    syncer_hosts = max(1, math.ceil(cores(msg_s, SYNCER_US)))
    ingress = cores(msg_s * callbacks_per_msg, CALLBACK_US)
    pipeline = consumers + hosts + syncer_hosts  # one core each, as placed
    total_mem = memory_gib + hosts * HOST_BASE_MIB / 1024 + (consumers + syncer_hosts) * 0.2
    nodes = max(2, math.ceil((pipeline + ingress) / NODE_VCPU), math.ceil(total_mem / NODE_GIB))
    return Sizing(
        users=users,
        msg_s=msg_s,
        consumers=consumers,
        partitions=max(PARTITIONS_MIN, consumers),
        hosts=hosts,
        syncer_hosts=syncer_hosts,
        ingress_cores=round(ingress, 1),
        pipeline_cores=round(pipeline, 1),
        memory_gib=round(total_mem, 1),
        nodes=nodes,
        redis_cores=(
            round(msg_s * REDIS_US_BEST / 1e6, 2),
            round(msg_s * REDIS_US_WORST / 1e6, 2),
        ),
        redis_flags_gib=round(done_flags_gib(msg_s), 1),
    )


def done_flags_gib(
    msg_s: float, ttl_s: int = DEDUP_TTL_S, bytes_per_flag: float = DONE_FLAG_BYTES
) -> float:
    """Redis memory of the done-flags at `msg_s` sustained: one flag per message, each
    kept `ttl_s` (consume.dedup_ttl_s)."""
    return msg_s * ttl_s * bytes_per_flag / 2**30


USERS = (10_000, 1_000_000, 10_000_000)
RATES = (1_000, 10_000, 100_000)


def table() -> str:
    """The sizing table of docs/capacity.md (markdown)."""
    rows = [
        "| live users | msg/s | worker nodes (8 vCPU, 32 GiB) | partitions | consumers "
        "| user hosts | syncer hosts (≥ open_kfids) | ingress cores (1 callback/msg) "
        "| mailbox + host memory | Redis cores (best–worst) "
        "| Redis memory: done-flags of 1 day |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for users in USERS:
        for rate in RATES:
            s = size(users, rate)
            rows.append(
                f"| {users:,} | {rate:,} | {s.nodes} | {s.partitions} | {s.consumers} "
                f"| {s.hosts} | {s.syncer_hosts} | {s.ingress_cores:g} | {s.memory_gib:g} GiB "
                f"| {s.redis_cores[0]:g}–{s.redis_cores[1]:g} | {s.redis_flags_gib:,g} GiB |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())

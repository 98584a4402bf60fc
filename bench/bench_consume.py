"""Consume benchmark: processed msg/s and Kafka-append -> handler-start latency.

Hosted mode, 10,000 users, 4 partitions, real Kafka/Redis/Ray. For each handler
(trivial, 5 ms asyncio.sleep) it measures (1) throughput draining a pre-produced backlog
and (2) latency p50/p99 while a producer writes at a steady rate; plus the raw
confluent-kafka consume rate on the same topic as the ceiling. Prints JSON lines.

    python bench/bench_consume.py --bootstrap 127.0.0.1:19092 --redis redis://127.0.0.1:16390/4
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from typing import Any

import ray
import redis

from qywx_ray.consume.pipeline import start_consumers, stop_consumers
from qywx_ray.consume.testing import ensure_topics, envelopes, produce, wait_for
from qywx_ray.kafka.config import consumer_config, producer_config
from qywx_ray.settings import Settings, load_settings

HANDLERS = {
    "trivial": "qywx_ray.consume.handlers:noop_handler",
    "sleep_5ms": "qywx_ray.consume.handlers:sleep_5ms_handler",
}


def make(args: argparse.Namespace, handler: str, tag: str) -> Settings:
    u = f"{tag}-{uuid.uuid4().hex[:6]}"
    args.run_id = u  # message ids are unique per run: no done-flags from earlier runs apply
    return load_settings(
        profile="development",
        overrides={
            "kafka": {
                "bootstrap_servers": args.bootstrap,
                "main_topic": {"name": f"bench-{u}", "partitions": args.partitions},
                "dlq_topic": {"name": f"bench-dlq-{u}"},
                "consumer": {"group_id": f"bench-{u}", "poll_timeout_s": args.poll_timeout_s},
            },
            "redis": {"url": args.redis},
            "consume": {
                "namespace": f"bench-{u}",
                "name_prefix": f"b{u}",
                "handler": handler,
                "num_hosts": args.hosts,
                "num_consumers": args.consumers,
            },
            "obs": {"log_level": "WARNING"},
        },
    )


def completed(p: Any) -> tuple[int, int]:
    snaps = p.snapshots()
    return sum(s["stats"]["completed"] for s in snaps), sum(s["stats"]["consumed"] for s in snaps)


def drain_rate(args: argparse.Namespace, name: str, handler: str) -> dict[str, Any]:
    s = make(args, handler, "t")
    ensure_topics(s)
    n = produce(s, envelopes(args.users, args.messages // args.users, prefix=f"b{args.run_id}-"))
    p = start_consumers(s)
    try:
        t_first = None
        deadline = time.monotonic() + args.timeout_s
        done = 0
        while time.monotonic() < deadline:
            done, consumed = completed(p)
            if t_first is None and consumed > 0:
                t_first = time.monotonic()
            if done >= n:
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - (t_first or time.monotonic())
        return {
            "bench": "consume_drain",
            "handler": name,
            "messages": n,
            "completed": done,
            "seconds": round(elapsed, 2),
            "msg_per_s": round(done / elapsed) if elapsed > 0 else None,
        }
    finally:
        stop_consumers(p, timeout_s=20)


def paced_latency(args: argparse.Namespace, name: str, handler: str) -> dict[str, Any]:
    from confluent_kafka import Producer

    s = make(args, handler, "l")
    ensure_topics(s)
    p = start_consumers(s)
    try:
        assert p.wait_assigned(args.partitions, 60)  # the group settled: no rebalance mid-run
        produce(s, envelopes(10, 1, prefix=f"w{args.run_id}-"))
        assert wait_for(lambda: completed(p)[0] >= 10, 60)
        for h in p.hosts:
            ray.get(h.latency_stats.remote(True))
        producer = Producer(producer_config(s.kafka))
        per_user = max(1, int(args.rate * args.paced_s) // args.users)
        msgs = envelopes(args.users, per_user, prefix=f"p{args.run_id}-")
        t0 = time.monotonic()
        for i, env in enumerate(msgs):
            due = t0 + i / args.rate
            while time.monotonic() < due:
                producer.poll(0)
                time.sleep(min(0.002, max(0.0, due - time.monotonic())))
            producer.produce(
                s.kafka.main_topic.name,
                key=env.key,
                value=env.to_bytes(),
                headers=list(env.headers()),  # type: ignore[arg-type]
            )
        producer.flush(30)
        wait_for(lambda: completed(p)[0] >= 10 + len(msgs), args.timeout_s)
        stats = [ray.get(h.latency_stats.remote(False)) for h in p.hosts]
        n = sum(st["n"] for st in stats)
        # merge percentiles conservatively: report the worst host's p50/p99
        return {
            "bench": "consume_latency",
            "handler": name,
            "rate_msg_per_s": args.rate,
            "messages": len(msgs),
            "samples": n,
            "p50_ms": max((st["p50_ms"] or 0) for st in stats),
            "p99_ms": max((st["p99_ms"] or 0) for st in stats),
            "max_ms": max((st["max_ms"] or 0) for st in stats),
            "arrival_p50_ms": max((st["arrival_p50_ms"] or 0) for st in stats),
            "arrival_p99_ms": max((st["arrival_p99_ms"] or 0) for st in stats),
            "note": "Kafka record timestamp -> handler start; worst host's percentiles",
        }
    finally:
        stop_consumers(p, timeout_s=20)


def raw_rate(args: argparse.Namespace) -> dict[str, Any]:
    from confluent_kafka import Consumer

    s = make(args, HANDLERS["trivial"], "r")
    ensure_topics(s)
    n = produce(s, envelopes(args.users, args.messages // args.users, prefix=f"r{args.run_id}-"))
    c = Consumer(consumer_config(s.kafka))
    c.subscribe([s.kafka.main_topic.name])
    got = 0
    t_first = None
    deadline = time.monotonic() + args.timeout_s
    while got < n and time.monotonic() < deadline:
        batch = c.consume(1000, 0.5)
        if batch and t_first is None:
            t_first = time.monotonic()
        got += sum(1 for m in batch if m.error() is None)
    elapsed = time.monotonic() - (t_first or time.monotonic())
    c.close()
    return {
        "bench": "raw_kafka_consume",
        "messages": got,
        "seconds": round(elapsed, 2),
        "msg_per_s": round(got / elapsed) if elapsed > 0 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    quick = os.environ.get("QYWX_BENCH_QUICK") == "1"
    ap.add_argument("--bootstrap", default=os.environ.get("QYWX_BENCH_BOOTSTRAP", "127.0.0.1:9092"))
    ap.add_argument(
        "--redis", default=os.environ.get("QYWX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--messages", type=int, default=20_000 if quick else 50_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2_000.0, help="paced latency run, msg/s")
    ap.add_argument("--paced-s", type=float, default=10.0)
    ap.add_argument("--timeout-s", type=float, default=180.0)
    ap.add_argument("--only", choices=["drain", "latency", "raw"], default=None)
    ap.add_argument("--handler", choices=list(HANDLERS), default=None)
    ap.add_argument("--poll-timeout-s", type=float, default=0.05, help="kafka.consumer setting")
    args = ap.parse_args()
    redis.Redis.from_url(args.redis).ping()
    ray.init(include_dashboard=False, log_to_driver=False, namespace="bench")
    try:
        if args.only in (None, "raw"):
            print(json.dumps(raw_rate(args)), flush=True)
        for name, handler in HANDLERS.items():
            if args.handler not in (None, name):
                continue
            if args.only in (None, "drain"):
                print(json.dumps(drain_rate(args, name, handler)), flush=True)
            if args.only in (None, "latency"):
                print(json.dumps(paced_latency(args, name, handler)), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

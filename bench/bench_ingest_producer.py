"""Benchmark: confirmed-by-batch produce throughput (the syncer's hot path).

Pages of --page envelopes (~1 KiB each, like a text message with its envelope) are sent
with KafkaIngestProducer.produce_batch, each page awaited before the next one (as one
KfSyncer does), with --concurrency pages in flight at once (several open_kfids).
Prints one JSON line per run and a summary line with the medians (the vCPUs here are
noisy: quote medians). Never touches anything but its own throwaway topic.

  python -m bench.bench_ingest_producer --bootstrap 127.0.0.1:19092 --messages 50000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic

from bench.stats import percentiles
from qywx_ray.envelope import Envelope
from qywx_ray.ingest.producer import KafkaIngestProducer
from qywx_ray.kafka.config import admin_config
from qywx_ray.kafka.settings import KafkaSettings, TopicSettings


def make_envelopes(n: int, users: int, payload_bytes: int, tag: str) -> list[Envelope]:
    text = "x" * payload_bytes
    return [
        Envelope.from_wecom(
            {
                "msgid": f"{tag}-{i}",
                "open_kfid": "wkBench",
                "external_userid": f"wmBenchUser{i % users:05d}",
                "send_time": 1_700_000_000,
                "origin": 3,
                "msgtype": "text",
                "text": {"content": text},
            }
        )
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank (bench.stats), NaN for no samples (a run that delivered nothing)."""
    return percentiles(values, (q * 100,))[q * 100] if values else float("nan")


async def one_run(
    producer: KafkaIngestProducer, envs: list[Envelope], page: int, concurrency: int
) -> dict[str, Any]:
    pages = [envs[i : i + page] for i in range(0, len(envs), page)]
    queue: asyncio.Queue[list[Envelope]] = asyncio.Queue()
    for p in pages:
        queue.put_nowait(p)
    latencies: list[float] = []
    page_times: list[float] = []
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while not queue.empty():
            batch = queue.get_nowait()
            t0 = time.perf_counter()
            result = await producer.produce_batch(batch)
            page_times.append(time.perf_counter() - t0)
            failed += len(result.failed)
            latencies.extend(d.latency_s for d in result.deliveries if d.latency_s is not None)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "messages": len(envs),
        "failed": failed,
        "page": page,
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "msg_per_s": round(len(envs) / elapsed),
        "delivery_p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "delivery_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "page_p50_ms": round(percentile(page_times, 0.50) * 1000, 2),
    }


async def main_async(args: argparse.Namespace) -> int:
    topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(
        bootstrap_servers=args.bootstrap,
        main_topic=TopicSettings(
            name=topic, partitions=args.partitions, replication_factor=1, min_insync_replicas=1
        ),
    )
    admin = AdminClient(admin_config(kafka))
    admin.create_topics([NewTopic(topic, num_partitions=args.partitions, replication_factor=1)])[
        topic
    ].result(timeout=30)
    producer = KafkaIngestProducer(kafka, delivery_wait_timeout_s=60)
    size = len(make_envelopes(1, 1, args.payload_bytes, "size")[0].to_bytes())
    runs = []
    try:
        # Warm-up: connections, metadata, producer id.
        await producer.produce_batch(make_envelopes(args.page, args.users, args.payload_bytes, "w"))
        for run in range(args.repeat):
            for concurrency in args.concurrency:
                envs = make_envelopes(
                    args.messages, args.users, args.payload_bytes, f"r{run}c{concurrency}"
                )
                row = await one_run(producer, envs, args.page, concurrency)
                row.update({"run": run, "envelope_bytes": size, "topic": topic})
                runs.append(row)
                print(json.dumps({"bench": "ingest_producer", **row}), flush=True)
    finally:
        producer.close(30)
        admin.delete_topics([topic])
    for concurrency in args.concurrency:
        rows = [r for r in runs if r["concurrency"] == concurrency]
        summary = {
            "bench": "ingest_producer_summary",
            "concurrency": concurrency,
            "page": args.page,
            "envelope_bytes": size,
            "runs": len(rows),
            "median_msg_per_s": statistics.median(r["msg_per_s"] for r in rows),
            "median_delivery_p50_ms": statistics.median(r["delivery_p50_ms"] for r in rows),
            "median_delivery_p99_ms": statistics.median(r["delivery_p99_ms"] for r in rows),
            "failed": sum(r["failed"] for r in rows),
        }
        print(json.dumps(summary), flush=True)
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quick = os.environ.get("QYWX_BENCH_QUICK") == "1"
    ap.add_argument("--bootstrap", default=os.environ.get("QYWX_BENCH_BOOTSTRAP", "127.0.0.1:9092"))
    ap.add_argument("--messages", type=int, default=10_000 if quick else 50_000)
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--payload-bytes", type=int, default=700)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1 if quick else 3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())

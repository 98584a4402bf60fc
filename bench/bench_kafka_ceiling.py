"""Benchmark: what Kafka itself allows here — the ceiling every pipeline stage is read against.

Four cases per run, 1 KiB records, the pipeline's producer semantics (acks=all, lz4,
idempotence, murmur2, same linger/batch), on the development topic layout:
  kafka_perf_produce / kafka_perf_consume  Kafka's own Java perf tools
  raw_produce / raw_consume                a bare confluent-kafka loop (our client library)
Prints JSON lines (bench.output.emit) and nothing else on stdout. Creates its own
topics (bench.services.bench_services) and deletes them on a shared broker.

  QYWX_BENCH_QUICK=1 QYWX_BENCH_BOOTSTRAP=127.0.0.1:19092 python -m bench.bench_kafka_ceiling
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from bench.kafka_tools import (
    PerfResult,
    PerfToolError,
    kafka_tools_available,
    raw_consume,
    raw_produce,
    run_consumer_perf,
    run_producer_perf,
)
from bench.output import emit, log
from bench.runs import default_runs, quick_mode
from bench.services import bench_services

BENCH = "kafka_ceiling"
CASES = ("kafka_perf_produce", "kafka_perf_consume", "raw_produce", "raw_consume")


def emit_result(
    case: str, result: PerfResult, run: int, context: dict[str, Any], topic: str
) -> None:
    """One JSON line per metric the tool measured (throughput always, latency if any)."""
    stage = "produce" if case.endswith("produce") else "consume"
    common = {"bench": BENCH, "case": case, "stage": stage, "run": run, **context}
    extra: dict[str, Any] = {
        "records": result.records,
        "elapsed_s": result.elapsed_s,
        "tool": result.tool,
        "topic": topic,
    }
    if result.rebalance_ms is not None:
        extra["rebalance_ms"] = result.rebalance_ms
    emit(**common, metric="throughput", value=result.records_per_s, unit="records/s", extra=extra)
    emit(**common, metric="throughput_bytes", value=result.mb_per_s, unit="MiB/s", extra=extra)
    for metric, value in (
        ("latency_avg", result.avg_latency_ms),
        ("latency_p50", result.p50_latency_ms),
        ("latency_p99", result.p99_latency_ms),
        ("latency_max", result.max_latency_ms),
    ):
        if value is not None:
            emit(**common, metric=metric, value=value, unit="ms", extra=extra)


def main(argv: list[str] | None = None) -> int:
    quick = quick_mode()
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=default_runs(3))
    ap.add_argument("--records", type=int, default=20_000 if quick else 200_000)
    ap.add_argument("--record-size", type=int, default=1024)
    ap.add_argument("--users", type=int, default=1000, help="distinct keys (raw loop)")
    ap.add_argument("--brokers", type=int, choices=(1, 3), default=1)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--timeout-s", type=float, default=120.0 if quick else 600.0)
    args = ap.parse_args(argv)

    java_ok = kafka_tools_available()
    if not java_ok:
        log("kafka_ceiling: Java or the cached Kafka jars are missing; perf-tool cases skipped")
    failures = 0
    with bench_services(brokers=args.brokers, redis=False) as svc:
        kafka = svc.settings.kafka
        topic = kafka.main_topic.name
        from qywx_ray.kafka.config import consumer_config, producer_config

        pconf = producer_config(kafka)
        context = {
            "record_size": args.record_size,
            "partitions": kafka.main_topic.partitions,
            "brokers": args.brokers,
            "acks": pconf["acks"],
            "compression": pconf["compression.type"],
            "linger_ms": pconf["linger.ms"],
        }
        for run in range(args.runs):
            for case in args.cases:
                if case.startswith("kafka_perf") and not java_ok:
                    continue
                try:
                    if case == "kafka_perf_produce":
                        result = run_producer_perf(
                            pconf, topic, args.records, args.record_size, timeout_s=args.timeout_s
                        )
                    elif case == "kafka_perf_consume":
                        result = run_consumer_perf(
                            svc.bootstrap_servers, topic, args.records, timeout_s=args.timeout_s
                        )
                    elif case == "raw_produce":
                        result = raw_produce(
                            pconf,
                            topic,
                            args.records,
                            args.record_size,
                            users=args.users,
                            timeout_s=args.timeout_s,
                        )
                    else:
                        group = f"bench-raw-{uuid.uuid4().hex[:8]}"
                        result = raw_consume(
                            consumer_config(kafka, group_id=group),
                            topic,
                            args.records,
                            timeout_s=args.timeout_s,
                        )
                except PerfToolError as exc:
                    failures += 1
                    log(f"kafka_ceiling: run {run} {case} failed: {exc}")
                    emit(
                        bench=BENCH,
                        case=case,
                        kind="error",
                        run=run,
                        error=str(exc)[:500],
                        **context,
                    )
                    continue
                emit_result(case, result, run, {**context, "records": args.records}, topic)
                log(
                    f"kafka_ceiling: run {run} {case}: {result.records_per_s:,.0f} records/s, "
                    f"{result.mb_per_s:.1f} MiB/s"
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

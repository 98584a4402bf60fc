"""Kafka throughput ceilings: Kafka's own perf tools and a raw confluent-kafka loop.

Both use the pipeline's producer semantics (acks=all, lz4, idempotence, same linger and
batch size, taken from qywx_ray.kafka.config.producer_config) and the same record size,
so a stage's throughput can be read against what the broker and client allow on this
machine. Parsing is pure and unit-tested; running needs a broker. Never writes to a
topic it was not given, and never leaves a JVM behind (bounded by timeout_s).
"""

from __future__ import annotations

import random
import re
import string
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.stats import percentiles

MIB = 1024 * 1024

QUIET_LOG4J2 = """status = error
appender.console.type = Console
appender.console.name = STDERR
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %p %m%n
rootLogger.level = ERROR
rootLogger.appenderRef.stderr.ref = STDERR
"""

PRODUCER_MAIN = "org.apache.kafka.tools.ProducerPerformance"
CONSUMER_MAIN = "org.apache.kafka.tools.ConsumerPerformance"


class PerfToolError(RuntimeError):
    """A perf tool failed, timed out, or printed nothing we can parse."""


@dataclass
class PerfResult:
    """One ceiling measurement; latency fields are None where the tool does not measure it."""

    tool: str
    records: int
    records_per_s: float
    mb_per_s: float
    elapsed_s: float | None = None
    avg_latency_ms: float | None = None
    p50_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    max_latency_ms: float | None = None
    rebalance_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Parsing (pure)

_PRODUCER_FINAL = re.compile(
    r"(?P<records>\d+) records sent, (?P<rps>[\d.]+) records/sec \((?P<mbps>[\d.]+) MB/sec\), "
    r"(?P<avg>[\d.]+) ms avg latency, (?P<max>[\d.]+) ms max latency, "
    r"(?P<p50>[\d.]+) ms 50th, (?P<p95>[\d.]+) ms 95th, (?P<p99>[\d.]+) ms 99th"
)


def parse_producer_perf(output: str) -> PerfResult:
    """The final summary line of ProducerPerformance (progress lines lack percentiles)."""
    matches = list(_PRODUCER_FINAL.finditer(output))
    if not matches:
        raise PerfToolError(f"no ProducerPerformance summary in output:\n{output[-1500:]}")
    m = matches[-1]
    records = int(m["records"])
    rps = float(m["rps"])
    return PerfResult(
        tool="kafka-producer-perf-test",
        records=records,
        records_per_s=rps,
        mb_per_s=float(m["mbps"]),
        elapsed_s=round(records / rps, 3) if rps > 0 else None,
        avg_latency_ms=float(m["avg"]),
        p50_latency_ms=float(m["p50"]),
        p99_latency_ms=float(m["p99"]),
        max_latency_ms=float(m["max"]),
    )


def parse_consumer_perf(output: str) -> PerfResult:
    """ConsumerPerformance's CSV header + value line; throughput excludes the group join.

    The tool's overall nMsg.sec includes the rebalance (seconds here); the fetch rates
    are the steady consume ceiling, which is what we compare a consumer stage with.
    """
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("start.time") and i + 1 < len(lines):
            header = [h.strip() for h in line.split(",")]
            values = [v.strip() for v in lines[i + 1].split(",")]
            if len(values) != len(header):
                continue
            row = dict(zip(header, values, strict=True))
            try:
                records = int(float(row["data.consumed.in.nMsg"]))
                fetch_ms = float(row["fetch.time.ms"])
                return PerfResult(
                    tool="kafka-consumer-perf-test",
                    records=records,
                    records_per_s=float(row["fetch.nMsg.sec"]),
                    mb_per_s=float(row["fetch.MB.sec"]),
                    elapsed_s=round(fetch_ms / 1000.0, 3),
                    rebalance_ms=float(row["rebalance.time.ms"]),
                )
            except (KeyError, ValueError) as exc:
                raise PerfToolError(f"unexpected ConsumerPerformance row {row}: {exc}") from exc
    raise PerfToolError(f"no ConsumerPerformance result in output:\n{output[-1500:]}")


def java_producer_props(producer_conf: dict[str, Any]) -> dict[str, str]:
    """The Java-producer equivalent of our librdkafka producer config (same semantics)."""
    wanted = {
        "bootstrap.servers": "bootstrap.servers",
        "acks": "acks",
        "compression.type": "compression.type",
        "enable.idempotence": "enable.idempotence",
        "linger.ms": "linger.ms",
        "batch.size": "batch.size",
        "max.in.flight.requests.per.connection": "max.in.flight.requests.per.connection",
        "request.timeout.ms": "request.timeout.ms",
        "delivery.timeout.ms": "delivery.timeout.ms",
        "retry.backoff.ms": "retry.backoff.ms",
    }
    props: dict[str, str] = {}
    for ours, theirs in wanted.items():
        if ours in producer_conf:
            value = producer_conf[ours]
            props[theirs] = str(value).lower() if isinstance(value, bool) else str(value)
    # Java requires linger < delivery timeout - request timeout; ours already satisfies it.
    return props


# ---------------------------------------------------------------------------------------
# Kafka's own perf tools (JVM subprocesses)


def _java_cmd(main: str, heap_mb: int, log4j: Path) -> list[str]:
    from qywx_ray.devstack.kafka import ensure_kafka_jars, java_bin

    libs = ensure_kafka_jars()
    return [
        java_bin(),
        f"-Xmx{heap_mb}m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs}/*",
        main,
    ]


def _run_tool(argv: list[str], timeout_s: float) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, start_new_session=True
        )
    except subprocess.TimeoutExpired as exc:
        # subprocess.run kills the child on timeout; the JVM has no children of its own.
        raise PerfToolError(f"{argv[-1]} timed out after {timeout_s:.0f}s") from exc
    if proc.returncode != 0:
        raise PerfToolError(
            f"{' '.join(argv[:1] + argv[-8:])} exited {proc.returncode}:\n"
            f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
        )
    return proc.stdout


def run_producer_perf(
    producer_conf: dict[str, Any],
    topic: str,
    num_records: int,
    record_size: int,
    *,
    timeout_s: float = 300.0,
    heap_mb: int = 256,
) -> PerfResult:
    """kafka-producer-perf-test: unthrottled, our acks/compression/idempotence/linger/batch."""
    props = java_producer_props(producer_conf)
    with tempfile.TemporaryDirectory(prefix="qywx-perf-") as tmp:
        log4j = Path(tmp) / "log4j2.properties"
        log4j.write_text(QUIET_LOG4J2)
        argv = [
            *_java_cmd(PRODUCER_MAIN, heap_mb, log4j),
            "--topic",
            topic,
            "--num-records",
            str(num_records),
            "--record-size",
            str(record_size),
            "--throughput",
            "-1",
            "--producer-props",
            *(f"{k}={v}" for k, v in props.items()),
        ]
        return parse_producer_perf(_run_tool(argv, timeout_s))


def run_consumer_perf(
    bootstrap_servers: str,
    topic: str,
    num_records: int,
    *,
    consumer_props: dict[str, str] | None = None,
    timeout_s: float = 300.0,
    heap_mb: int = 256,
) -> PerfResult:
    """kafka-consumer-perf-test from the earliest offset, a fresh group, read_committed."""
    group = f"bench-perf-{uuid.uuid4().hex[:8]}"
    props = {
        "isolation.level": "read_committed",
        "auto.offset.reset": "earliest",
        # No committed offsets: the throwaway group vanishes instead of littering the broker.
        "enable.auto.commit": "false",
        **(consumer_props or {}),
    }
    with tempfile.TemporaryDirectory(prefix="qywx-perf-") as tmp:
        log4j = Path(tmp) / "log4j2.properties"
        log4j.write_text(QUIET_LOG4J2)
        conf = Path(tmp) / "consumer.properties"
        conf.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        argv = [
            *_java_cmd(CONSUMER_MAIN, heap_mb, log4j),
            "--bootstrap-server",
            bootstrap_servers,
            "--topic",
            topic,
            "--messages",
            str(num_records),
            "--group",
            group,
            "--timeout",
            str(int(min(timeout_s, 120) * 1000)),
            "--consumer.config",
            str(conf),
        ]
        return parse_consumer_perf(_run_tool(argv, timeout_s))


# ---------------------------------------------------------------------------------------
# Raw confluent-kafka loops (same client library as the pipeline)


def make_payloads(record_size: int, count: int = 256, seed: int = 7) -> list[bytes]:
    """Random upper-case letters like ProducerPerformance's payloads (lz4 barely shrinks them)."""
    rng = random.Random(seed)
    letters = string.ascii_uppercase
    return ["".join(rng.choices(letters, k=record_size)).encode("ascii") for _ in range(count)]


def raw_produce(
    producer_conf: dict[str, Any],
    topic: str,
    num_records: int,
    record_size: int,
    *,
    users: int = 1000,
    timeout_s: float = 300.0,
) -> PerfResult:
    """Produce keyed records (key = a user id, as in the pipeline) as fast as librdkafka takes them.

    Throughput counts until every delivery report is in; latency is librdkafka's own
    produce()→ack time per record (Message.latency()).
    """
    from confluent_kafka import Producer

    payloads = make_payloads(record_size)
    keys = [f"wmBenchUser{i:05d}".encode() for i in range(users)]
    latencies_s: list[float] = []
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
            return
        lat = msg.latency()
        if lat is not None:
            latencies_s.append(lat)

    producer = Producer(producer_conf)
    deadline = time.monotonic() + timeout_s
    # Warm-up: metadata, connections and the idempotent producer id are not the ceiling.
    producer.produce(topic, value=payloads[0], key=keys[0])
    producer.flush(30)
    started = time.perf_counter()
    for i in range(num_records):
        while True:
            try:
                producer.produce(
                    topic,
                    value=payloads[i % len(payloads)],
                    key=keys[i % len(keys)],
                    on_delivery=on_delivery,
                )
                break
            except BufferError:
                producer.poll(0.05)
                if time.monotonic() > deadline:
                    raise PerfToolError("raw produce timed out with a full queue") from None
        if i % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(max(1.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - started
    if remaining:
        raise PerfToolError(f"raw produce: {remaining} records undelivered at the deadline")
    if errors:
        raise PerfToolError(f"raw produce: {len(errors)} delivery errors, first: {errors[0]}")
    if not latencies_s:
        raise PerfToolError("raw produce: no delivery latencies reported")
    avg_ms = 1000.0 * sum(latencies_s) / len(latencies_s)
    pct = percentiles(latencies_s, (50, 99, 100))
    return PerfResult(
        tool="confluent-kafka-produce",
        records=num_records,
        records_per_s=round(num_records / elapsed, 1),
        mb_per_s=round(num_records * record_size / elapsed / MIB, 3),
        elapsed_s=round(elapsed, 3),
        avg_latency_ms=round(avg_ms, 2),
        p50_latency_ms=round(1000.0 * pct[50], 2),
        p99_latency_ms=round(1000.0 * pct[99], 2),
        max_latency_ms=round(1000.0 * pct[100], 2),
    )


def raw_consume(
    consumer_conf: dict[str, Any],
    topic: str,
    num_records: int,
    *,
    batch_max: int = 1000,
    timeout_s: float = 300.0,
) -> PerfResult:
    """Read num_records from the earliest offsets of every partition with batched consume().

    Partitions are assigned (no group join), so the figure is the fetch ceiling, timed
    from the first record received to the last, like ConsumerPerformance's fetch rate.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(consumer_conf)
    try:
        md = consumer.list_topics(topic, timeout=30)
        partitions = sorted(md.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout_s
        received = 0
        received_bytes = 0
        started: float | None = None
        while received < num_records:
            if time.monotonic() > deadline:
                raise PerfToolError(
                    f"raw consume: {received}/{num_records} records after {timeout_s:.0f}s"
                )
            batch = consumer.consume(num_messages=batch_max, timeout=0.5)
            for msg in batch:
                if msg.error() is not None:
                    continue
                if started is None:
                    started = time.perf_counter()
                received += 1
                received_bytes += len(msg.value() or b"")
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        consumer.close()
    elapsed = max(elapsed, 1e-6)
    return PerfResult(
        tool="confluent-kafka-consume",
        records=received,
        records_per_s=round(received / elapsed, 1),
        mb_per_s=round(received_bytes / elapsed / MIB, 3),
        elapsed_s=round(elapsed, 3),
    )


def kafka_tools_available() -> bool:
    """True when Java and the cached Kafka jars are present (no download is attempted)."""
    import shutil

    from qywx_ray.devstack.kafka import kafka_libs_dir

    return shutil.which("java") is not None and (kafka_libs_dir() / ".complete").exists()


__all__ = [
    "PerfResult",
    "PerfToolError",
    "java_producer_props",
    "kafka_tools_available",
    "make_payloads",
    "parse_consumer_perf",
    "parse_producer_perf",
    "raw_consume",
    "raw_produce",
    "run_consumer_perf",
    "run_producer_perf",
]

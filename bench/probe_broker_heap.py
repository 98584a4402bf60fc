"""Probe: the local broker's collector under our own producer and consumer only.

Why: the consume bench's steady windows showed the broker running concurrent G1 cycles
(Remark, Mixed) on a fresh broker. This starts the local broker alone (devstack), produces
`--rate` records of `--value-bytes` over 4 partitions with our producer config while one
consumer with our consumer config reads them, and prints every collector pause of the
measured phase from the broker's `-Xlog:gc` file with the heap before -> after (live after
a young collection is what the broker keeps). Not a benchmark: a diagnostic, one run.

    python -m bench.probe_broker_heap [--rate 2000] [--warmup-s 20] [--measure-s 20]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.broker_gc import parse_pauses
from bench.services import produce_paced
from qywx_ray.devstack.kafka import GC_LOG, KafkaCluster
from qywx_ray.kafka.config import consumer_config, producer_config
from qywx_ray.settings import Settings


def _paced(producer: Producer, rate: float, seconds: float, value: bytes) -> None:
    keys = (b"u%d" % (i % 10_000) for i in range(int(rate * seconds)))
    produce_paced(producer, "probe", [(key, value, None) for key in keys], rate)
    producer.flush(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rate", type=float, default=2_000.0)
    ap.add_argument("--value-bytes", type=int, default=300)
    ap.add_argument("--warmup-s", type=float, default=20.0)
    ap.add_argument("--measure-s", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qywx-probe-") as tmp:
        cluster = KafkaCluster(Path(tmp) / "kafka", brokers=1).start()
        try:
            s = Settings()
            s.kafka.bootstrap_servers = cluster.bootstrap_servers
            admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
            admin.create_topics([NewTopic("probe", 4, 1)])["probe"].result(30)
            producer = Producer(producer_config(s.kafka))
            config = consumer_config(s.kafka)
            config.update({"group.id": "probe", "auto.offset.reset": "earliest"})
            consumer = Consumer(config)
            consumer.subscribe(["probe"])
            stop = threading.Event()
            consumed = [0]

            def consume() -> None:
                while not stop.is_set():
                    consumed[0] += len(consumer.consume(1_000, 0.05))

            reader = threading.Thread(target=consume, name="probe-consumer")
            reader.start()
            value = b"x" * args.value_bytes
            gc_log = cluster.nodes[0].workdir / "logs" / GC_LOG
            try:
                _paced(producer, args.rate, args.warmup_s, value)
                seen = len(gc_log.read_text())
                _paced(producer, args.rate, args.measure_s, value)
            finally:
                stop.set()
                reader.join(30)
                consumer.close()
            pauses = parse_pauses(gc_log.read_text()[seen:].splitlines())
            print(f"consumed {consumed[0]}; pauses in the measured {args.measure_s:g} s:")
            for pause in pauses:
                print(f"  {pause.kind}: heap {pause.heap}, {pause.ms} ms")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()

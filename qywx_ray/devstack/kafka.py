"""A real Apache Kafka (KRaft) on loopback, from Maven Central jars: 1 broker or 3.

Used by `make demo`, the tests and the drills. Each node runs broker+controller in one
JVM; the 3-node profile forms a real 3-voter quorum, so killing a node is a real
leader failover. Never used in production: there, brokers are yours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from qywx_ray.devstack.procs import ManagedProcess, free_port, port_open, wait_until
from qywx_ray.errors import InfraError

KAFKA_VERSION = "4.1.1"
GC_LOG = "gc.log"  # in each broker node's logs/ (-Xlog:gc, epoch-ms decorated)
POM = Path(__file__).with_name("kafka-pom.xml")

LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def cache_dir() -> Path:
    return Path(os.environ.get("QYWX_CACHE_DIR", Path.home() / ".cache" / "qywx-ray"))


def kafka_libs_dir() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}" / "libs"


def maven_copy_dependencies(pom: Path, libs: Path, what: str, expect_glob: str, stamp: str) -> Path:
    """Fetch a POM's runtime jars into `libs` with Maven, once: `libs/.complete` marks a
    finished fetch; a partial one is redone. `expect_glob` must match a jar afterwards.
    Used for Kafka's broker jars and for the benchmark peers'."""
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise InfraError(f"Maven (mvn) is needed to fetch {what}: apt-get install maven")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    argv = ["mvn", "-B", "-q", "-f", str(pom), "dependency:copy-dependencies"]
    argv += [f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"Maven did not finish fetching {what} in 900 s") from exc
    if result.returncode != 0:
        raise InfraError(f"Maven could not fetch {what}:\n{result.stdout[-3000:]}")
    if not any(tmp.glob(expect_glob)):
        raise InfraError(f"Maven finished but no {expect_glob} is in {tmp}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.write_text(stamp)
    return libs


def ensure_kafka_jars() -> Path:
    """Fetch the broker jars with Maven once; later calls find them in the cache."""
    return maven_copy_dependencies(
        POM, kafka_libs_dir(), f"Kafka {KAFKA_VERSION}", "kafka_2.13-*.jar", KAFKA_VERSION
    )


def java_bin() -> str:
    java = shutil.which("java")
    if java is None:
        raise InfraError("Java 17+ is needed to run Kafka: apt-get install openjdk-17-jre-headless")
    return java


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    workdir: Path
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class KafkaCluster:
    """1 or 3 KRaft nodes on loopback with their own data directory."""

    base_dir: Path
    brokers: int = 1
    ports: list[int] | None = None
    # Fixed controller ports (the dev stack's well-known ones); free ports otherwise. A
    # node keeps its ports across kill9/start_node, so restarts land on the same ones.
    controller_ports: list[int] | None = None
    heap_mb: int = 512
    nodes: list[KafkaNode] = field(default_factory=list)
    cluster_id: str = ""

    def __post_init__(self) -> None:
        if self.brokers not in (1, 3):
            raise InfraError(f"the local Kafka runs 1 or 3 brokers, not {self.brokers}")
        ports = self.ports or [free_port() for _ in range(self.brokers)]
        if len(ports) != self.brokers:
            raise InfraError("give one port per broker")
        self.nodes = [
            KafkaNode(
                node_id=i + 1,
                port=p,
                controller_port=self.controller_ports[i] if self.controller_ports else free_port(),
                workdir=self.base_dir / f"node{i + 1}",
            )
            for i, p in enumerate(ports)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def _properties(self, node: KafkaNode) -> str:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        rf = min(3, self.brokers)
        lines = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.workdir / "data"),
            "num.partitions": 1,
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": 8,
            # The log cleaner's dedupe map is allocated on the heap when the broker starts:
            # 128 MiB by default, most of this broker's small heap, which then ran a
            # concurrent G1 cycle every few seconds (bench/results/compare/README.md).
            # 16 MiB: ~0.6 M keys a cleaning pass (24 B a slot, load 0.9; more keys take
            # more passes), where a dev stack's __consumer_offsets holds a few thousand.
            "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min(2, rf),
            "group.initial.rebalance.delay.ms": 0,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": min(2, rf),
        }
        return "\n".join(f"{k}={v}" for k, v in lines.items()) + "\n"

    def _java(self, node: KafkaNode, main: str, *args: str) -> list[str]:
        libs = ensure_kafka_jars()
        # The broker logs its collector pauses (epoch ms, bounded by rotation): a latency
        # bench reads them to tell a broker pause from a stall of our own (bench/broker_gc.py).
        gc_file = node.workdir / "logs" / GC_LOG
        gc_log = (
            # Quoted: the option's own syntax splits on ':' (a colon in the path broke the start)
            [f'-Xlog:gc:file="{gc_file}":timemillis:filecount=2,filesize=10m']
            if main == "kafka.Kafka"
            else []
        )
        return [
            java_bin(),
            f"-Xmx{self.heap_mb}m",
            f"-Xms{min(256, self.heap_mb)}m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            *gc_log,
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={node.workdir / 'logs'}",
            f"-Dlog4j2.configurationFile={node.workdir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def format(self) -> None:
        """Write configs and format storage, once; a formatted cluster keeps its data."""
        id_file = self.base_dir / "cluster.id"
        if id_file.exists():
            self.cluster_id = id_file.read_text().strip()
        else:
            self.cluster_id = uuid.uuid4().hex[:22]
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (node.workdir / "logs").mkdir(parents=True, exist_ok=True)
            (node.workdir / "server.properties").write_text(self._properties(node))
            (node.workdir / "log4j2.properties").write_text(LOG4J2)
            if (node.workdir / "data" / "meta.properties").exists():
                continue
            argv = self._java(
                node,
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                # `=` form: a base64url id may start with "-" and read as an option.
                f"--cluster-id={_kafka_uuid(self.cluster_id)}",
                "-c",
                str(node.workdir / "server.properties"),
            )
            result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise InfraError(
                    f"kafka storage format failed on node {node.node_id}:\n"
                    f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
                )
        id_file.write_text(self.cluster_id)

    def start(self, timeout_s: float = 90.0) -> KafkaCluster:
        for node in self.nodes:
            if port_open(node.port):
                raise InfraError(
                    f"port {node.port} is already in use: is another Kafka running? "
                    f"(`qywx-ray dev down` stops the one `make demo` started)"
                )
        self.format()
        for node in self.nodes:
            self.start_node(node.node_id, wait=False)
        self.wait_ready(timeout_s)
        return self

    def start_node(self, node_id: int, wait: bool = True, timeout_s: float = 60.0) -> None:
        node = self.node(node_id)
        node.process = ManagedProcess(
            f"kafka-{node.node_id}",
            self._java(node, "kafka.Kafka", str(node.workdir / "server.properties")),
            node.workdir,
        )
        node.process.start()
        if wait:
            self.wait_ready(timeout_s, nodes=[node])

    def node(self, node_id: int) -> KafkaNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise InfraError(f"no Kafka node {node_id}")

    def wait_ready(self, timeout_s: float, nodes: list[KafkaNode] | None = None) -> None:
        from confluent_kafka.admin import AdminClient

        targets = nodes or self.nodes
        for node in targets:

            def up(node: KafkaNode = node) -> bool:
                if node.process is not None and not node.process.alive():
                    raise InfraError(
                        f"Kafka node {node.node_id} exited during start:\n{node.process.tail()}"
                        f"\n(see {node.workdir / 'logs' / 'server.log'})"
                    )
                return port_open(node.port)

            wait_until(up, timeout_s=timeout_s, what=f"Kafka node {node.node_id} to listen")
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})

        def all_registered() -> bool:
            try:
                md = admin.list_topics(timeout=2)
            except Exception:  # noqa: BLE001 - not registered yet, whatever the reason: asked again
                return False
            return all(n.node_id in md.brokers for n in targets)

        wait_until(all_registered, timeout_s=timeout_s, what="brokers to register", interval_s=0.3)

    def kill9(self, node_id: int) -> None:
        proc = self.node(node_id).process
        if proc:
            proc.kill9()

    def stop(self) -> None:
        for node in self.nodes:
            if node.process:
                node.process.stop()
            else:
                ManagedProcess(f"kafka-{node.node_id}", [], node.workdir).stop()

    def pids(self) -> list[int]:
        return [n.process.pid for n in self.nodes if n.process and n.process.pid]


def _kafka_uuid(seed: str) -> str:
    """Kafka wants a base64url UUID of 22 chars; derive it from our id deterministically."""
    import base64

    raw = uuid.UUID(hex=(seed + "0" * 32)[:32]).bytes
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")

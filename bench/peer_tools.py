"""Confluent Parallel Consumer, the peer: fetch it, compile bench/peer/PeerBench.java, run it.

What `bench_peer_parallel_consumer.py` needs apart from its own loop. Fetching is
idempotent and cached like the broker's jars (qywx_ray.devstack.kafka): Maven copies the
jars bench/peer/pom.xml names into ~/.cache/qywx-ray/peer-pc-<version>/libs once (a marker
file says the copy is complete); `javac` compiles the program into a folder named after
the source's hash, so an edited program is recompiled and an unchanged one never is.
Parsing the program's output and the ours/peer ratio are pure and unit-tested. Never
leaves a JVM running: each run is bounded by a timeout and killed at it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEER_DIR = Path(__file__).resolve().parent / "peer"
POM = PEER_DIR / "pom.xml"
SOURCE = PEER_DIR / "PeerBench.java"
MAIN_CLASS = "PeerBench"
# Its README's illustrative example: 10,000 messages, 10,000 keys, 1 partition, 0-5 ms
# random work, maxConcurrency 100, KEY order: 2.128 s.
PUBLISHED = {"keys": 10_000, "messages": 10_000, "concurrency": 100, "duration_s": 2.128}
PUBLISHED_MSG_S = PUBLISHED["messages"] / PUBLISHED["duration_s"]


class PeerError(RuntimeError):
    """The peer could not be fetched, compiled or run, or printed nothing we can read."""


def pom_property(name: str, pom: Path = POM) -> str:
    """A <properties> value of bench/peer/pom.xml (the versions live there only)."""
    m = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", pom.read_text())
    if m is None:
        raise PeerError(f"{pom} has no <{name}> property")
    return m.group(1).strip()


def peer_versions() -> dict[str, str]:
    return {
        "parallel_consumer": pom_property("pc.version"),
        "kafka_clients": pom_property("kafka-clients.version"),
    }


def peer_cache_dir() -> Path:
    from qywx_ray.devstack.kafka import cache_dir

    v = peer_versions()
    return cache_dir() / f"peer-pc-{v['parallel_consumer']}-kc-{v['kafka_clients']}"


def ensure_peer_jars() -> Path:
    """Parallel Consumer + kafka-clients + runtime deps in one folder (Maven, once)."""
    from qywx_ray.devstack.kafka import maven_copy_dependencies
    from qywx_ray.errors import InfraError

    try:
        return maven_copy_dependencies(
            POM,
            peer_cache_dir() / "libs",
            "Parallel Consumer",
            "parallel-consumer-core-*.jar",
            json.dumps(peer_versions()),
        )
    except InfraError as exc:
        raise PeerError(str(exc)) from exc


def ensure_peer_classes(libs: Path) -> Path:
    """bench/peer/PeerBench.java compiled (javac, once per source version)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    classes = peer_cache_dir() / f"classes-{digest}"
    if (classes / f"{MAIN_CLASS}.class").exists():
        return classes
    javac = shutil.which("javac")
    if javac is None:
        raise PeerError(
            "javac is needed for the peer bench: apt-get install openjdk-17-jdk-headless"
        )
    tmp = classes.with_name(classes.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    argv = [javac, "-d", str(tmp), "-cp", f"{libs}/*", str(SOURCE)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise PeerError("javac did not finish in 300 s") from exc
    if result.returncode != 0:
        raise PeerError(f"javac failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(classes, ignore_errors=True)
    tmp.rename(classes)
    for old in classes.parent.glob("classes-*"):  # builds of earlier versions of the source
        if old != classes:
            shutil.rmtree(old, ignore_errors=True)
    return classes


def ensure_peer() -> tuple[Path, Path]:
    """(libs, classes): everything `java -cp classes:libs/* PeerBench` needs."""
    libs = ensure_peer_jars()
    return libs, ensure_peer_classes(libs)


# ---------------------------------------------------------------------------------------
# The program's output (pure)


@dataclass(frozen=True)
class PeerRun:
    """One measured drain by Parallel Consumer (one JSON line of PeerBench)."""

    case: str
    run: int
    status: str  # ok | stalled | timeout | order_violations
    concurrency: int
    work: str
    commit_mode: str
    expected: int
    processed: int
    elapsed_s: float
    throughput: float
    order_violations: int
    committed: int
    close_s: float
    paused_partitions: int
    load1: float | None = None  # the machine's 1-min load average when the drain ended
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.processed >= self.expected

    @property
    def fully_committed(self) -> bool:
        """At-least-once held: the group's committed offsets cover every record."""
        return self.committed >= self.expected


_FIELDS = (
    ("case", str),
    ("run", int),
    ("status", str),
    ("concurrency", int),
    ("work", str),
    ("commit_mode", str),
    ("expected", int),
    ("processed", int),
    ("elapsed_s", float),
    ("throughput", float),
    ("order_violations", int),
    ("committed", int),
    ("close_s", float),
    ("paused_partitions", int),
)


def parse_peer_line(line: str) -> PeerRun | None:
    """One stdout line of PeerBench → a PeerRun; None for anything that is not a result.

    Raises PeerError for a result line that lacks a field or has one of the wrong type:
    a half-read result must not become a number in the report.
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("event") != "result":
        return None
    values: dict[str, Any] = {}
    for name, kind in _FIELDS:
        if name not in record:
            raise PeerError(f"peer result without {name!r}: {line[:300]}")
        raw = record[name]
        if kind is str:
            if not isinstance(raw, str):
                raise PeerError(f"peer result field {name!r} is not a string: {raw!r}")
            values[name] = raw
            continue
        if not _is_number(raw):
            raise PeerError(f"peer result field {name!r} is not a number: {raw!r}")
        values[name] = kind(raw)
    raw_load = record.get("load1")
    load1 = (
        float(raw_load)
        if isinstance(raw_load, int | float) and not isinstance(raw_load, bool)
        else None
    )
    return PeerRun(
        **values,
        load1=load1 if load1 is not None and load1 >= 0 else None,
        detail=str(record.get("detail", "")),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_peer_output(stdout: str) -> list[PeerRun]:
    """Every result line of one PeerBench process, in order."""
    out = []
    for line in stdout.splitlines():
        parsed = parse_peer_line(line)
        if parsed is not None:
            out.append(parsed)
    return out


def work_spec(handler: str) -> str:
    """Our handler name → PeerBench's work spec (the same work in both pipelines)."""
    specs = {"trivial": "none", "sleep_5ms": "sleep5", "random_0_5ms": "random0-5"}
    try:
        return specs[handler]
    except KeyError:
        raise PeerError(f"no peer work for handler {handler!r}") from None


def ratio(ours: float | None, peer: float | None) -> float | None:
    """ours / peer throughput, None when either is missing or the peer did nothing."""
    if ours is None or peer is None or peer <= 0 or ours < 0:
        return None
    return ours / peer


def peer_command(
    libs: Path,
    classes: Path,
    *,
    bootstrap: str,
    topic: str,
    records: int,
    cases: list[tuple[str, int, str]],
    repeat: int,
    warmup: int,
    commit_mode: str,
    stall_s: float,
    timeout_s: float,
    heap_mb: int = 768,
) -> list[str]:
    """The `java` argv for one PeerBench process (cases: (name, concurrency, work))."""
    from qywx_ray.devstack.kafka import java_bin

    argv = [
        java_bin(),
        f"-Xmx{heap_mb}m",
        "-XX:+UseG1GC",
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        "-Dorg.slf4j.simpleLogger.logFile=System.err",
        "-cp",
        f"{classes}:{libs}/*",
        MAIN_CLASS,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--records",
        str(records),
        "--repeat",
        str(repeat),
        "--warmup",
        str(warmup),
        "--commit-mode",
        commit_mode,
        "--stall-s",
        str(stall_s),
        "--timeout-s",
        str(timeout_s),
    ]
    for name, concurrency, work in cases:
        argv += ["--case", f"{name}:{concurrency}:{work}"]
    return argv


def run_peer(argv: list[str], timeout_s: float) -> tuple[list[PeerRun], str, int]:
    """Run PeerBench; (results, stderr tail, exit code). The JVM is killed at the timeout."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, start_new_session=True
        )
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or ""
        out = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return parse_peer_output(out), f"timed out after {timeout_s:.0f} s", -1
    return parse_peer_output(proc.stdout), proc.stderr[-3000:], proc.returncode


if __name__ == "__main__":
    # `make bench`'s setup step: fetch and compile once, print where (idempotent).
    try:
        found_libs, found_classes = ensure_peer()
    except PeerError as exc:
        print(f"bench: peer setup failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"bench: Parallel Consumer jars in {found_libs}, PeerBench in {found_classes}")

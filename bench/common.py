"""Helpers every benchmark script uses: JSON-line output, percentiles, machine facts, services.

A benchmark prints one JSON object per measurement to stdout (`emit`) and nothing else
there (diagnostics go to stderr). Medians of repeated runs are what we quote, so every
line is self-describing: bench, case, metric, value, unit, run, plus its context.
This module never touches the shared development services unless QYWX_BENCH_BOOTSTRAP /
QYWX_BENCH_REDIS_URL point at them, and never leaves a process it started running.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"

QUICK_ENV = "QYWX_BENCH_QUICK"
RUNS_ENV = "QYWX_BENCH_RUNS"
BOOTSTRAP_ENV = "QYWX_BENCH_BOOTSTRAP"
REDIS_ENV = "QYWX_BENCH_REDIS_URL"
RUN_ID_ENV = "QYWX_BENCH_RUN_ID"

# Keys that are never a grouping dimension of a measurement (they vary run to run).
VOLATILE_KEYS = frozenset(
    {"value", "run", "ts", "run_id", "extra", "kind", "load1", "topic", "group", "elapsed_s"}
)


def quick_mode() -> bool:
    """QYWX_BENCH_QUICK=1: a short smoke run (one run, small volumes)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def default_runs(default: int = 3) -> int:
    """How many repeated runs: 1 in quick mode, else QYWX_BENCH_RUNS or `default`."""
    if quick_mode():
        return 1
    raw = os.environ.get(RUNS_ENV, "")
    return max(1, int(raw)) if raw.strip() else default


def percentiles(
    samples: Iterable[float], qs: Sequence[float] = (50, 99, 100)
) -> dict[float, float]:
    """Nearest-rank percentiles: q=0 is the minimum, q=100 the maximum, p50 a real sample.

    Raises ValueError on an empty sample set: a percentile of nothing is a bug upstream.
    """
    ordered = sorted(float(s) for s in samples)
    if not ordered:
        raise ValueError("percentiles of an empty sample set")
    n = len(ordered)
    out: dict[float, float] = {}
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        rank = max(1, math.ceil(q / 100.0 * n))
        out[q] = ordered[rank - 1]
    return out


def median(values: Iterable[float]) -> float:
    """The middle value (mean of the two middle ones for an even count)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("median of an empty sequence")
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


# ---------------------------------------------------------------------------------------
# Machine facts


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    # Read-only: rev-parse never writes the index.
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def cpu_jiffies() -> dict[str, int]:
    """The aggregate `cpu` line of /proc/stat (user, system, idle, steal, ...)."""
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return {}
    return {n: int(v) for n, v in zip(names, first[1:], strict=False)}


def steal_pct(before: dict[str, int], after: dict[str, int]) -> float | None:
    """Share of CPU time the hypervisor stole between two cpu_jiffies() snapshots."""
    if not before or not after:
        return None
    total = sum(after.values()) - sum(before.values())
    if total <= 0:
        return None
    return round(100.0 * (after.get("steal", 0) - before.get("steal", 0)) / total, 2)


def machine_facts() -> dict[str, Any]:
    """Cores, memory, load, versions: recorded with every run (the vCPUs here are noisy)."""
    import confluent_kafka

    try:
        from qywx_ray.devstack.kafka import KAFKA_VERSION
    except ImportError:  # pragma: no cover - the package is installed in the project env
        KAFKA_VERSION = "unknown"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = os.cpu_count() or 0
    load1, load5, load15 = os.getloadavg()
    return {
        "hostname": socket.gethostname(),
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_bytes": _meminfo_bytes("MemTotal"),
        "mem_available_bytes": _meminfo_bytes("MemAvailable"),
        "loadavg": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ray": _dist_version("ray"),
        "confluent_kafka": _dist_version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka": KAFKA_VERSION,
        "redis_py": _dist_version("redis"),
        "redis_server": _redis_server_version(),
        "java": _java_version(),
        "git_commit": _git_commit(),
    }


def _redis_server_version() -> str | None:
    path = shutil.which("redis-server")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for token in out.stdout.split():
        if token.startswith("v="):
            return token[2:]
    return out.stdout.strip() or None


def _java_version() -> str | None:
    path = shutil.which("java")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stderr or out.stdout).splitlines()
    return first[0].strip() if first else None


# ---------------------------------------------------------------------------------------
# Output


class Emitter:
    """Writes JSON lines; the first line of a process carries the machine facts."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._facts_written = False

    def emit(self, **fields: Any) -> dict[str, Any]:
        out = self.stream or sys.stdout
        if not self._facts_written:
            self._facts_written = True
            facts = {"kind": "machine", "ts": round(time.time(), 3), **machine_facts()}
            if fields.get("bench"):
                facts["bench"] = fields["bench"]
            run_id = os.environ.get(RUN_ID_ENV)
            if run_id:
                facts["run_id"] = run_id
            out.write(json.dumps(facts, sort_keys=True) + "\n")
        record: dict[str, Any] = {"ts": round(time.time(), 3), **fields}
        record.setdefault("kind", "measurement")
        record.setdefault("mode", "quick" if quick_mode() else "full")
        record.setdefault("load1", round(os.getloadavg()[0], 2))
        run_id = os.environ.get(RUN_ID_ENV)
        if run_id:
            record.setdefault("run_id", run_id)
        out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        out.flush()
        return record

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Measurements inside are discarded (an unrecorded warm-up run)."""
        stream, facts_written = self.stream, self._facts_written
        with open(os.devnull, "w") as devnull:
            self.stream = devnull
            try:
                yield
            finally:
                self.stream, self._facts_written = stream, facts_written


_EMITTER = Emitter()


def emit(**fields: Any) -> dict[str, Any]:
    """Print one measurement as a JSON line on stdout, flushed.

    Expected fields: bench, case, metric, value, unit, run; anything else is context
    (record_size, partitions, users, mode, ...) and becomes a grouping dimension in the
    report, except per-run details, which belong under `extra`.
    """
    return _EMITTER.emit(**fields)


def log(message: str) -> None:
    """Human diagnostics go to stderr, never to the JSON stream."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# Services


@dataclass
class BenchServices:
    bootstrap_servers: str
    redis_url: str | None
    settings: Any  # qywx_ray.settings.Settings (typed loosely: bench is not a package)
    workdir: Path
    brokers: int
    external: bool


def settings_for(
    bootstrap_servers: str,
    redis_url: str | None,
    workdir: Path,
    overrides: dict[str, Any] | None = None,
    tag: str | None = None,
) -> Any:
    """Development-profile Settings pointing at the bench services, topics unique to `tag`."""
    from qywx_ray.settings import _deep_merge, load_settings

    tag = tag or uuid.uuid4().hex[:8]
    base: dict[str, Any] = {
        "data_dir": str(workdir / "data"),
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "main_topic": {"name": f"bench-main-{tag}"},
            "dlq_topic": {"name": f"bench-dlq-{tag}"},
            "consumer": {"group_id": f"bench-{tag}"},
        },
    }
    if redis_url:
        base["redis"] = {"url": redis_url}
    return load_settings(profile="development", overrides=_deep_merge(base, overrides or {}))


def exit_on_sigterm() -> None:
    """Turn SIGTERM (the harness's timeout) into SystemExit so `finally` blocks stop services.

    The devstack starts Kafka and Redis in their own sessions, out of reach of a signal
    to the bench's process group: only our own cleanup can stop them.
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


@contextlib.contextmanager
def bench_services(
    *,
    brokers: int = 1,
    redis: bool = True,
    overrides: dict[str, Any] | None = None,
    create_topics: bool = True,
) -> Iterator[BenchServices]:
    """Kafka (+ Redis) for one benchmark: throwaway ones in a temp dir, or the given ones.

    With QYWX_BENCH_BOOTSTRAP (and QYWX_BENCH_REDIS_URL) set, those are used and only
    the topics this call created are deleted at the end; otherwise a fresh KafkaCluster
    (1 or 3 brokers) and RedisServer are started and stopped by PID.
    """
    from qywx_ray.devstack.kafka import KafkaCluster
    from qywx_ray.devstack.redis import RedisServer
    from qywx_ray.kafka.topics import ensure_topics

    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="qywx-bench-"))
    cluster: KafkaCluster | None = None
    redis_server: RedisServer | None = None
    external = bool(os.environ.get(BOOTSTRAP_ENV))
    created: list[str] = []
    settings: Any = None
    try:
        bootstrap = os.environ.get(BOOTSTRAP_ENV, "")
        if not bootstrap:
            log(f"bench: starting a throwaway {brokers}-broker Kafka in {workdir}")
            cluster = KafkaCluster(workdir / "kafka", brokers=brokers).start()
            bootstrap = cluster.bootstrap_servers
        redis_url: str | None = None
        if redis:
            redis_url = os.environ.get(REDIS_ENV) or None
            if redis_url is None:
                redis_server = RedisServer(workdir / "redis").start()
                redis_url = redis_server.url
        settings = settings_for(bootstrap, redis_url, workdir, overrides)
        if create_topics:
            reports = ensure_topics(settings.kafka)
            created = [r.name for r in reports if r.action == "created"]
        yield BenchServices(bootstrap, redis_url, settings, workdir, brokers, external)
    finally:
        if external and created and settings is not None:
            _delete_topics(settings.kafka, created)
        if redis_server is not None:
            redis_server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _delete_topics(kafka: Any, names: list[str], timeout_s: float = 15.0) -> None:
    from confluent_kafka.admin import AdminClient

    from qywx_ray.kafka.config import admin_config

    # Keep the client referenced until every future resolves: a collected AdminClient
    # silently drops its pending requests.
    admin = AdminClient(admin_config(kafka))
    try:
        futures = admin.delete_topics(names, operation_timeout=timeout_s, request_timeout=timeout_s)
        for name, fut in futures.items():
            try:
                fut.result(timeout=timeout_s)
            except Exception as exc:  # a leftover topic must not fail the benchmark
                log(f"bench: could not delete topic {name}: {exc}")
    except Exception as exc:
        log(f"bench: could not delete topics {names}: {exc}")
    finally:
        del admin


# ---------------------------------------------------------------------------------------
# Process groups: CPU and memory of the pipeline's parts, read from /proc (no psutil)

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# (substring of the command line, group), first match wins. Ray workers rename
# themselves "ray::<ActorClass>" (proctitle), so actor classes are recognisable.
PROCESS_GROUPS: tuple[tuple[str, str], ...] = (
    ("kafka.Kafka", "kafka"),
    ("kafka.server", "kafka"),
    ("redis-server", "redis"),
    ("qywx_ray.wecom.simulator", "simulator"),
    ("gcs_server", "ray_gcs"),
    ("raylet", "ray_raylet"),
    ("ray::PartitionConsumer", "consumer"),
    ("ray::UserHost", "hosts"),
    ("ray::DedicatedUserActor", "hosts"),
    ("ray::SyncerHost", "syncer"),
    ("ray::ServeReplica", "serve"),
    ("ray::ProxyActor", "serve"),
    ("ray::HTTPProxyActor", "serve"),
    ("ray::ServeController", "serve"),
    ("ray::DLQRecoveryActor", "dlq"),
    ("ray::IDLE", "ray_idle_workers"),
    ("ray::DashboardAgent", "ray_other"),
    ("ray::RuntimeEnvAgent", "ray_other"),
    ("ray::", "ray_other_actors"),
    ("ray/dashboard", "ray_other"),
    ("ray/_private", "ray_other"),
    ("runtime_env", "ray_other"),
)


def classify_process(cmdline: str, *, driver: bool = False) -> str:
    """The group a process's CPU and memory are counted under (see PROCESS_GROUPS)."""
    if driver:
        return "bench_driver"
    for needle, group in PROCESS_GROUPS:
        if needle in cmdline:
            return group
    if "java" in cmdline and "kafka" in cmdline.lower():
        return "kafka"
    return "other"


@dataclass(frozen=True)
class ProcSample:
    pid: int
    ppid: int
    cmdline: str
    cpu_ticks: int  # utime + stime, in clock ticks
    rss_bytes: int


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(ppid, utime+stime ticks) from /proc/<pid>/stat (the comm field may hold spaces)."""
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is the state (field 3): ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]) + int(rest[12])


def read_proc(pid: int) -> ProcSample | None:
    base = Path("/proc") / str(pid)
    try:
        ppid, ticks = parse_proc_stat((base / "stat").read_text())
        cmd = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        rss_pages = int((base / "statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return ProcSample(pid, ppid, cmd.strip(), ticks, rss_pages * PAGE_SIZE)


def descendants(roots: Iterable[int], parents: dict[int, int]) -> set[int]:
    """Every pid whose ancestry reaches one of `roots` (the roots included)."""
    roots = set(roots)
    out: set[int] = set()
    for pid in parents:
        seen: list[int] = []
        cur: int | None = pid
        while cur is not None and cur > 1 and cur not in out and cur not in seen:
            if cur in roots:
                out.add(cur)
                break
            seen.append(cur)
            cur = parents.get(cur)
        if cur is not None and (cur in out or cur in roots):
            out.update(seen)
    return out


def scan_processes(roots: Iterable[int], extra_pids: Iterable[int] = ()) -> list[ProcSample]:
    """/proc samples of the process trees under `roots`, plus `extra_pids` (e.g. a Kafka
    broker started elsewhere) and their descendants."""
    samples: dict[int, ProcSample] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            sample = read_proc(int(entry.name))
            if sample is not None:
                samples[sample.pid] = sample
    wanted = descendants([*roots, *extra_pids], {p: s.ppid for p, s in samples.items()})
    return [samples[p] for p in sorted(wanted)]


def group_samples(samples: Iterable[ProcSample], driver_pid: int) -> dict[int, str]:
    return {s.pid: classify_process(s.cmdline, driver=s.pid == driver_pid) for s in samples}


def cpu_by_group(
    before: Sequence[ProcSample],
    after: Sequence[ProcSample],
    elapsed_s: float,
    groups: dict[int, str],
    clk_tck: int = CLK_TCK,
) -> dict[str, float]:
    """CPU per group between two scans, in % of one core (200 = both cores here).

    Only processes alive in both scans count (a process that started or ended in between
    is missing its share: scans bracket a steady-state window)."""
    if elapsed_s <= 0:
        raise ValueError("elapsed_s must be positive")
    start = {s.pid: s.cpu_ticks for s in before}
    out: dict[str, float] = {}
    for s in after:
        if s.pid not in start:
            continue
        group = groups.get(s.pid, "other")
        delta = max(0, s.cpu_ticks - start[s.pid]) / clk_tck
        out[group] = out.get(group, 0.0) + 100.0 * delta / elapsed_s
    return {g: round(v, 1) for g, v in sorted(out.items(), key=lambda kv: -kv[1])}


def rss_by_group(samples: Iterable[ProcSample], groups: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        group = groups.get(s.pid, "other")
        out[group] = out.get(group, 0) + s.rss_bytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def hottest_pid(
    before: Sequence[ProcSample],
    after: Sequence[ProcSample],
    groups: dict[int, str],
    python_only: bool = True,
) -> tuple[int, str, int] | None:
    """(pid, group, ticks) of the single busiest process between two scans; with
    python_only, Kafka (Java) and Redis are skipped (py-spy profiles Python only)."""
    start = {s.pid: s.cpu_ticks for s in before}
    best: tuple[int, str, int] | None = None
    for s in after:
        group = groups.get(s.pid, "other")
        if python_only and group in {"kafka", "redis", "ray_gcs", "ray_raylet"}:
            continue
        if s.pid not in start:
            continue
        delta = s.cpu_ticks - start[s.pid]
        if best is None or delta > best[2]:
            best = (s.pid, group, delta)
    return best


def pid_listening_on(port: int) -> int | None:
    """The pid of the process listening on a TCP port (best effort, via /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(entry.name)
    return None


# ---------------------------------------------------------------------------------------
# py-spy profiles


def speedscope_top(data: dict[str, Any], n: int = 15) -> list[dict[str, Any]]:
    """Top functions by self time (% of all samples) from a py-spy speedscope profile.

    py-spy names a frame per line; lines of one function (name + file) are summed."""
    frames = data.get("shared", {}).get("frames", [])
    self_weight: dict[tuple[str, str], float] = {}
    total = 0.0
    for profile in data.get("profiles", []):
        samples = profile.get("samples", [])
        weights = profile.get("weights") or [1.0] * len(samples)
        for stack, weight in zip(samples, weights, strict=False):
            total += weight
            if not stack:
                continue
            idx = stack[-1]
            frame = frames[idx] if 0 <= idx < len(frames) else {}
            key = (str(frame.get("name", "?")), str(frame.get("file", "?")))
            self_weight[key] = self_weight.get(key, 0.0) + weight
    if total <= 0:
        return []
    top = sorted(self_weight.items(), key=lambda kv: -kv[1])[:n]
    return [
        {"function": name, "file": file, "self_pct": round(100.0 * weight / total, 2)}
        for (name, file), weight in top
    ]


def py_spy_record(
    pid: int, out_path: Path, duration_s: int, rate_hz: int = 50, timeout_s: float | None = None
) -> dict[str, Any]:
    """`py-spy record --format speedscope` of one process → its top functions.

    Never raises: a failed profile is reported in the result ({"error": ...})."""
    exe = shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy not installed"}
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration_s),
        "--rate",
        str(rate_hz),
        "--format",
        "speedscope",
        "--output",
        str(out_path),
        "--nonblocking",
    ]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s or duration_s + 60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"py-spy failed: {exc!r}"}
    if proc.returncode != 0 or not out_path.exists():
        return {"error": f"py-spy exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    try:
        data = json.loads(out_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"unreadable profile: {exc!r}"}
    return {"path": str(out_path), "top": speedscope_top(data)}

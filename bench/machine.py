"""Machine facts recorded with every result: CPU, memory, versions, steal time."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from bench.runs import ROOT


def meminfo_bytes(field: str) -> int | None:
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


def _jiffies_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int] | None:
    """Per field, `after - before` of two cpu_jiffies() snapshots; None without a span."""
    if not before or not after:
        return None
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return delta if sum(delta.values()) > 0 else None


def steal_pct(before: dict[str, int], after: dict[str, int]) -> float | None:
    """Share of CPU time the hypervisor stole between two cpu_jiffies() snapshots."""
    delta = _jiffies_delta(before, after)
    if delta is None:
        return None
    return round(100.0 * delta.get("steal", 0) / sum(delta.values()), 2)


def online_cpus() -> int:
    """CPUs the aggregate `cpu` line of /proc/stat sums over (one `cpuN` line each)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return os.cpu_count() or 1
    return sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit()) or 1


def busy_pct(
    before: dict[str, int], after: dict[str, int], cpus: int | None = None
) -> float | None:
    """The whole machine's busy CPU between two cpu_jiffies() snapshots, in % of one
    core (200 = both cores of this box): every process, the kernel's own work included.
    Time the hypervisor stole is neither busy nor counted: the CPU was not ours."""
    delta = _jiffies_delta(before, after)
    if delta is None:
        return None
    ours = sum(delta.values()) - delta.get("steal", 0)
    if ours <= 0:
        return None
    idle = delta.get("idle", 0) + delta.get("iowait", 0)
    return round(100.0 * (cpus or online_cpus()) * (ours - idle) / ours, 2)


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
        "mem_total_bytes": meminfo_bytes("MemTotal"),
        "mem_available_bytes": meminfo_bytes("MemAvailable"),
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

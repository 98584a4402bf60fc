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


def steal_pct(before: dict[str, int], after: dict[str, int]) -> float | None:
    """Share of CPU time the hypervisor stole between two cpu_jiffies() snapshots."""
    if not before or not after:
        return None
    total = sum(after.values()) - sum(before.values())
    if total <= 0:
        return None
    return round(100.0 * (after.get("steal", 0) - before.get("steal", 0)) / total, 2)


def busy_pct(before: dict[str, int], after: dict[str, int]) -> float | None:
    """The whole machine's busy CPU between two cpu_jiffies() snapshots, in % of one
    core (200 = both cores of this box): every process, the kernel's own work included."""
    if not before or not after:
        return None
    total = sum(after.values()) - sum(before.values())
    if total <= 0:
        return None
    idle = sum(after.get(k, 0) - before.get(k, 0) for k in ("idle", "iowait"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return round(100.0 * cores * (total - idle) / total, 2)


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

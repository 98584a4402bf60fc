"""CPU and memory of the pipeline's parts, read from /proc (no psutil): which process is
the consumer, a host, the broker, and what each spent."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# (substring of the command line, group), first match wins. Ray workers rename
# themselves "ray::<ActorClass>" (proctitle), so actor classes are recognisable.
PROCESS_GROUPS: tuple[tuple[str, str], ...] = (
    ("kafka.Kafka", "kafka"),
    ("kafka.server", "kafka"),
    ("redis-server", "redis"),
    ("qywx_ray.testing.wecomsim", "simulator"),
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


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a live process has used; raises OSError once it is gone."""
    return parse_proc_stat((Path("/proc") / str(pid) / "stat").read_text())[1] / CLK_TCK


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """rss, pss (shared pages split among their users) and uss (private clean + dirty), in
    bytes, from /proc/<pid>/smaps_rollup. For N processes of one kind, uss is what one more
    costs the node; rss counts the shared libraries in each of them again."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "Rss:":
            out["rss"] = int(parts[1]) * 1024
        elif parts[0] == "Pss:":
            out["pss"] = int(parts[1]) * 1024
        elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
            out["uss"] += int(parts[1]) * 1024
    return out


def proc_memory(pid: int) -> dict[str, int]:
    """parse_smaps_rollup of a live process."""
    return parse_smaps_rollup((Path("/proc") / str(pid) / "smaps_rollup").read_text())


def thread_count(pid: int) -> int:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


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
    samples = scan_all()
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


def scan_all() -> dict[int, ProcSample]:
    """Every process on the machine (the neighbours too: they share the 2 cores)."""
    out: dict[int, ProcSample] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            sample = read_proc(int(entry.name))
            if sample is not None:
                out[sample.pid] = sample
    return out


def cpu_slices(
    scans: Sequence[tuple[float, dict[int, ProcSample]]],
    driver_pid: int,
    top: int = 4,
    clk_tck: int = CLK_TCK,
) -> list[list[Any]]:
    """CPU between consecutive scans: [seconds since the first scan, the whole machine's
    % of one core (200 = both cores here), {group: %} of the `top` groups], so a latency
    stall can be matched to the group that ran (or the machine being full) at that time."""
    out: list[list[Any]] = []
    for (t0, before), (t1, after) in itertools.pairwise(scans):
        if t1 <= t0:
            continue
        groups = group_samples(after.values(), driver_pid)
        by_group = cpu_by_group(
            list(before.values()), list(after.values()), t1 - t0, groups, clk_tck
        )
        total = round(sum(by_group.values()), 1)
        out.append([round(t0 - scans[0][0], 2), total, dict(list(by_group.items())[:top])])
    return out


class CpuSampler:
    """Scans every process each `period_s` on a thread while a window runs; `slices()`
    then gives `cpu_slices` of the window. Bench evidence, never a result."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.scans: list[tuple[float, dict[int, ProcSample]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self._scan()
            if self._stop.wait(self.period_s):
                self._scan()
                return

    def _scan(self) -> None:
        t0 = time.monotonic()
        got = scan_all()
        self.scans.append(((t0 + time.monotonic()) / 2, got))  # ~10 ms per scan here

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def slices(self) -> list[list[Any]]:
        return cpu_slices(self.scans, os.getpid())

"""Run every bench/bench_*.py, collect their JSON lines, then write bench/REPORT.md.

What `make bench` runs. Each bench is a subprocess with its own timeout; a bench that
fails or times out is recorded (status, exit code, stderr tail) and the others still
run. Results go to bench/results/<name>.jsonl (overwritten each run) and
bench/results/machine.json. One throwaway Kafka + Redis is started for the whole run
(unless QYWX_BENCH_BOOTSTRAP / QYWX_BENCH_REDIS_URL are set) and handed to every bench
through those variables; it is stopped by PID at the end. Never edits a bench script.

  python -m bench.run_all [--quick] [--only ceiling consume] [--timeout-s 900]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.machine import cpu_jiffies, machine_facts, steal_pct
from bench.output import log
from bench.report import write_report
from bench.runs import (
    BOOTSTRAP_ENV,
    QUICK_ENV,
    REDIS_ENV,
    RESULTS_DIR,
    ROOT,
    RUN_ID_ENV,
    quick_mode,
)
from bench.services import bench_services

BENCH_DIR = ROOT / "bench"
CEILING_SCRIPT = "bench_kafka_ceiling"
STDERR_TAIL_CHARS = 3000
DEFAULT_TIMEOUT_S = 900.0
DEFAULT_QUICK_TIMEOUT_S = 240.0
# A bench that needs longer than the default says so in one line of its source:
#   # bench-timeout-s: full=1500 quick=600
TIMEOUT_MARK = "# bench-timeout-s:"


@dataclass
class BenchOutcome:
    name: str
    status: str  # ok | failed | timeout | error
    returncode: int | None
    elapsed_s: float
    lines: int


def discover(bench_dir: Path = BENCH_DIR, only: list[str] | None = None) -> list[Path]:
    """Every bench/bench_*.py (ceilings first, then by name), optionally filtered by name."""
    # The ceilings run first, so every stage in the run is read against fresh ones.
    scripts = sorted(bench_dir.glob("bench_*.py"), key=lambda s: (s.stem != CEILING_SCRIPT, s.stem))
    if only:
        scripts = [s for s in scripts if any(o in s.stem for o in only)]
    return scripts


def declared_timeout(source: str, quick: bool) -> float | None:
    """The timeout a bench declares for itself (see TIMEOUT_MARK), or None."""
    for line in source.splitlines():
        if not line.startswith(TIMEOUT_MARK):
            continue
        fields = dict(
            part.split("=", 1) for part in line[len(TIMEOUT_MARK) :].split() if "=" in part
        )
        raw = fields.get("quick" if quick else "full")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None
    return None


def timeout_for(script: Path, quick: bool, override_s: float | None) -> float:
    """--timeout-s wins; else the bench's own declaration; else the harness default."""
    if override_s:
        return override_s
    try:
        declared = declared_timeout(script.read_text(encoding="utf-8"), quick)
    except OSError:
        declared = None
    return declared or (DEFAULT_QUICK_TIMEOUT_S if quick else DEFAULT_TIMEOUT_S)


def bench_name(script: Path) -> str:
    return script.stem.removeprefix("bench_")


def bench_argv(script: Path) -> list[str]:
    """A bench of this package runs as a module (`python -m bench.bench_x`, cwd = repo
    root, so `bench` and `qywx_ray` import without path tricks); another script (a test's
    stand-in) by its path."""
    if script.parent.resolve() == Path(__file__).resolve().parent:
        return [sys.executable, "-m", f"bench.{script.stem}"]
    return [sys.executable, str(script)]


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float = 45.0) -> None:
    """SIGTERM the bench's process group, then SIGKILL after a grace period.

    The grace is long enough for a bench to stop the Kafka/Redis it started (see
    bench.services.exit_on_sigterm); SIGKILL would orphan them.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_one(script: Path, results_dir: Path, env: dict[str, str], timeout_s: float) -> BenchOutcome:
    """Run one bench; write its JSON lines + a final harness line to <name>.jsonl."""
    name = bench_name(script)
    out_path = results_dir / f"{name}.jsonl"
    err_path = results_dir / f"{name}.stderr.log"
    cpu_before = cpu_jiffies()
    load_start = round(os.getloadavg()[0], 2)
    started = time.monotonic()
    status = "ok"
    returncode: int | None = None
    stdout = b""
    with open(err_path, "wb") as err_file:
        try:
            proc = subprocess.Popen(
                bench_argv(script),
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err_file,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            err_file.write(f"cannot start {script}: {exc}\n".encode())
            status = "error"
        else:
            try:
                stdout, _ = proc.communicate(timeout=timeout_s)
                returncode = proc.returncode
                status = "ok" if returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                with contextlib.suppress(Exception):
                    rest, _ = proc.communicate(timeout=5)
                    stdout = rest or b""
                returncode = proc.returncode
                status = "timeout"
            except BaseException:
                # Ctrl-C or a harness bug: the bench runs in its own session, stop it too.
                _stop_group(proc, grace_s=5.0)
                raise
    elapsed = round(time.monotonic() - started, 2)
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.strip()]
    json_lines = []
    non_json = 0
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            non_json += 1
            continue
        json_lines.append(line)
    stderr_tail = err_path.read_text(errors="replace")[-STDERR_TAIL_CHARS:]
    harness: dict[str, Any] = {
        "kind": "harness",
        "bench": name,
        "script": str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else str(script),
        "status": status,
        "returncode": returncode,
        "elapsed_s": elapsed,
        "timeout_s": timeout_s,
        "json_lines": len(json_lines),
        "non_json_lines": non_json,
        "load1_start": load_start,
        "load1_end": round(os.getloadavg()[0], 2),
        "steal_pct": steal_pct(cpu_before, cpu_jiffies()),
        "run_id": env.get(RUN_ID_ENV),
        "stderr_tail": stderr_tail if status != "ok" else "",
    }
    out_path.write_text("\n".join([*json_lines, json.dumps(harness)]) + "\n", encoding="utf-8")
    return BenchOutcome(name, status, returncode, elapsed, len(json_lines))


def clear_results(results_dir: Path) -> None:
    """A full run replaces every result, so a bench that vanished leaves nothing stale."""
    for pattern in ("*.jsonl", "*.stderr.log", "*.png", "*.speedscope.json", "machine.json"):
        for path in results_dir.glob(pattern):
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"short mode (sets {QUICK_ENV}=1)")
    ap.add_argument("--only", nargs="+", help="run only benches whose name contains one of these")
    ap.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        help="per bench (default: its own `# bench-timeout-s:` line, else 900, quick 240)",
    )
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--report", type=Path, default=BENCH_DIR / "REPORT.md")
    ap.add_argument(
        "--no-services",
        action="store_true",
        help="do not start shared services; each bench starts its own",
    )
    args = ap.parse_args(argv)

    env = dict(os.environ)
    if args.quick:
        env[QUICK_ENV] = "1"
        os.environ[QUICK_ENV] = "1"
    quick = quick_mode()
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    env[RUN_ID_ENV] = run_id
    env["PYTHONUNBUFFERED"] = "1"
    scripts = discover(only=args.only)
    if not scripts:
        log("run_all: no bench/bench_*.py matched")
        return 2
    results_dir: Path = args.results
    results_dir.mkdir(parents=True, exist_ok=True)
    if not args.only:
        clear_results(results_dir)

    started = time.time()
    outcomes: list[BenchOutcome] = []
    with contextlib.ExitStack() as stack:
        services: dict[str, Any] = {"external": bool(os.environ.get(BOOTSTRAP_ENV))}
        if not args.no_services:
            svc = stack.enter_context(bench_services(create_topics=False))
            env[BOOTSTRAP_ENV] = svc.bootstrap_servers
            if svc.redis_url:
                env[REDIS_ENV] = svc.redis_url
            services.update(bootstrap=svc.bootstrap_servers, redis_url=svc.redis_url)
        machine: dict[str, Any] = {
            "run_id": run_id,
            "mode": "quick" if quick else "full",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "benches": [bench_name(s) for s in scripts],
            "services": services,
            "facts": machine_facts(),
        }
        (results_dir / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
        for script in scripts:
            timeout_s = timeout_for(script, quick, args.timeout_s)
            log(f"run_all: {bench_name(script)} (timeout {timeout_s:.0f}s) ...")
            outcome = run_one(script, results_dir, env, timeout_s)
            outcomes.append(outcome)
            log(
                f"run_all: {outcome.name}: {outcome.status} in {outcome.elapsed_s:.1f}s, "
                f"{outcome.lines} JSON lines"
            )
    machine["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine["outcomes"] = [o.__dict__ for o in outcomes]
    (results_dir / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    report = write_report(results_dir, args.report)
    log(f"run_all: report written to {report}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

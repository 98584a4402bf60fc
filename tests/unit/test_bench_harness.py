"""Perf-tool output parsing and the run_all harness on tiny stand-in bench scripts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bench import run_all
from bench.kafka_tools import (
    PerfToolError,
    java_producer_props,
    make_payloads,
    parse_consumer_perf,
    parse_producer_perf,
)

PRODUCER_OUT = """\
49213 records sent, 9842.6 records/sec (9.61 MB/sec), 1400.2 ms avg latency, 2391.0 ms max latency.
100000 records sent, 13280.2 records/sec (12.97 MB/sec), 203.33 ms avg latency, \
593.00 ms max latency, 186 ms 50th, 381 ms 95th, 430 ms 99th, 434 ms 99.9th.
"""

CONSUMER_OUT = """\
start.time, end.time, data.consumed.in.MB, MB.sec, data.consumed.in.nMsg, nMsg.sec, \
rebalance.time.ms, fetch.time.ms, fetch.MB.sec, fetch.nMsg.sec
2026-11-27 13:26:32:112, 2026-11-27 13:26:37:841, 19.5313, 3.4092, 20000, 3491.0106, \
2801, 2928, 6.6705, 6830.6011
"""


def test_parse_producer_perf_takes_the_final_summary() -> None:
    r = parse_producer_perf(PRODUCER_OUT)
    assert r.records == 100_000
    assert r.records_per_s == 13280.2
    assert r.mb_per_s == 12.97
    assert (r.avg_latency_ms, r.p50_latency_ms, r.p99_latency_ms, r.max_latency_ms) == (
        203.33,
        186.0,
        430.0,
        593.0,
    )


def test_parse_consumer_perf_uses_fetch_rates_not_the_group_join() -> None:
    r = parse_consumer_perf("WARN something\n" + CONSUMER_OUT)
    assert r.records == 20_000
    assert r.records_per_s == 6830.6011
    assert r.mb_per_s == 6.6705
    assert r.rebalance_ms == 2801.0
    assert r.elapsed_s == 2.928
    assert r.p99_latency_ms is None


@pytest.mark.parametrize("bad", ["", "Exception in thread main", "start.time, end.time\n1"])
def test_parse_garbage_raises(bad: str) -> None:
    with pytest.raises(PerfToolError):
        parse_producer_perf(bad)
    with pytest.raises(PerfToolError):
        parse_consumer_perf(bad)


def test_java_props_mirror_our_producer_config() -> None:
    from qywx_ray.kafka.config import producer_config
    from qywx_ray.kafka.settings import KafkaSettings

    props = java_producer_props(producer_config(KafkaSettings(bootstrap_servers="h:1")))
    assert props["acks"] == "all"
    assert props["compression.type"] == "lz4"
    assert props["enable.idempotence"] == "true"
    assert props["bootstrap.servers"] == "h:1"
    assert props["linger.ms"] == "10"
    assert props["batch.size"] == "262144"
    assert "partitioner" not in props
    assert "log_level" not in props


def test_payloads_have_the_record_size() -> None:
    payloads = make_payloads(1024, count=4)
    assert {len(p) for p in payloads} == {1024}
    assert len(set(payloads)) == 4


# ---------------------------------------------------------------------------------------
# run_all harness


def _script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_discover_puts_ceilings_first_and_filters(tmp_path: Path) -> None:
    for name in ("bench_consume.py", "bench_kafka_ceiling.py", "bench_callback.py", "helper.py"):
        (tmp_path / name).write_text("")
    assert [p.name for p in run_all.discover(tmp_path)] == [
        "bench_kafka_ceiling.py",
        "bench_callback.py",
        "bench_consume.py",
    ]
    assert [p.name for p in run_all.discover(tmp_path, ["cons"])] == ["bench_consume.py"]


def test_run_one_collects_json_lines_and_skips_noise(tmp_path: Path) -> None:
    script = _script(
        tmp_path / "bench_ok.py",
        """
        import json, os
        print(json.dumps({"bench": "ok", "metric": "m", "value": 1, "run": 0}))
        print("a stray human line")
        print(json.dumps({"bench": "ok", "metric": "m", "value": 2, "run": 1,
                          "run_id": os.environ["QYWX_BENCH_RUN_ID"]}))
        """,
    )
    env = {"QYWX_BENCH_RUN_ID": "RID", "PATH": "/usr/bin:/bin"}
    outcome = run_all.run_one(script, tmp_path, env, timeout_s=60)
    assert (outcome.name, outcome.status, outcome.returncode, outcome.lines) == ("ok", "ok", 0, 2)
    lines = [json.loads(x) for x in (tmp_path / "ok.jsonl").read_text().splitlines()]
    assert [x.get("value") for x in lines[:2]] == [1, 2]
    assert lines[1]["run_id"] == "RID"
    harness = lines[-1]
    assert harness["kind"] == "harness"
    assert harness["status"] == "ok"
    assert harness["non_json_lines"] == 1
    assert harness["run_id"] == "RID"


def test_run_one_records_a_failure_with_its_stderr(tmp_path: Path) -> None:
    script = _script(
        tmp_path / "bench_bad.py",
        """
        import json, sys
        print(json.dumps({"bench": "bad", "metric": "m", "value": 1}), flush=True)
        sys.exit("broker unreachable")
        """,
    )
    outcome = run_all.run_one(script, tmp_path, {"PATH": "/usr/bin:/bin"}, timeout_s=60)
    assert outcome.status == "failed"
    assert outcome.returncode == 1
    assert outcome.lines == 1
    harness = json.loads((tmp_path / "bad.jsonl").read_text().splitlines()[-1])
    assert "broker unreachable" in harness["stderr_tail"]


def test_run_one_times_out_and_kills_the_bench(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = _script(
        tmp_path / "bench_hang.py",
        f"""
        import json, os, time
        print(json.dumps({{"bench": "hang", "metric": "m", "value": 1}}), flush=True)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(600)  # the bench under test hangs; the harness must stop it
        """,
    )
    outcome = run_all.run_one(script, tmp_path, {"PATH": "/usr/bin:/bin"}, timeout_s=3)
    assert outcome.status == "timeout"
    # Ended by the harness's signal at its timeout, not by finishing its 600 s sleep.
    assert outcome.returncode is not None
    assert outcome.returncode < 0
    pid = int(pid_file.read_text())
    from qywx_ray.devstack.procs import pid_alive

    assert not pid_alive(pid)
    lines = (tmp_path / "hang.jsonl").read_text().splitlines()
    assert len(lines) == 2  # what the bench printed before hanging is kept
    assert json.loads(lines[-1])["status"] == "timeout"


def test_timed_out_bench_still_runs_its_cleanup(tmp_path: Path) -> None:
    """A bench's `finally` (where bench_services stops Kafka/Redis) runs on the timeout."""
    marker = tmp_path / "cleaned"
    script = _script(
        tmp_path / "bench_cleanup.py",
        f"""
        import sys, time
        sys.path.insert(0, {str(run_all.ROOT)!r})
        from bench.services import exit_on_sigterm
        exit_on_sigterm()
        try:
            print("{{}}", flush=True)
            time.sleep(600)  # hangs like a stuck benchmark
        finally:
            open({str(marker)!r}, "w").write("stopped services")
        """,
    )
    outcome = run_all.run_one(script, tmp_path, {"PATH": "/usr/bin:/bin"}, timeout_s=3)
    assert outcome.status == "timeout"
    assert outcome.returncode == 128 + 15  # SystemExit from SIGTERM, not a SIGKILL
    assert marker.read_text() == "stopped services"


def test_slow_profile_places_slow_samples_in_their_tenth_of_the_window() -> None:
    from bench.bench_consume import SLOW_MS, slow_profile

    samples = [10] * 100
    samples[3] = samples[55] = samples[56] = SLOW_MS + 1
    samples[99] = SLOW_MS  # at the target, not over it
    got = slow_profile({"p99_ms": 42, "arrival_p99_ms": 7, "max_ms": 51}, samples)
    assert got["slow_by_tenth"] == [1, 0, 0, 0, 0, 2, 0, 0, 0, 0]
    assert (got["n"], got["p99_ms"], got["arrival_p99_ms"]) == (100, 42, 7)
    assert slow_profile({}, [])["slow_by_tenth"] == [0] * 10


def test_broker_gc_pauses_in_a_window_from_the_jvm_log(tmp_path: Path) -> None:
    from bench import broker_gc

    logs = tmp_path / "node1" / "logs"
    logs.mkdir(parents=True)
    (logs / "gc.log").write_text(
        "[1000000ms] Using G1\n"
        "[1000500ms] GC(1) Pause Young (Normal) (G1 Evacuation Pause) 60M->9M(256M) 4.321ms\n"
        "[1002000ms] GC(2) Pause Young (Normal) (G1 Evacuation Pause) 70M->9M(256M) 12.5ms\n"
        "[1002100ms] GC(3) Concurrent Mark Cycle 40.0ms\n"  # concurrent: not a pause
        "[1002200ms] GC(3) Pause Remark 50M->50M(256M) 1.0ms\n"
        "[1009000ms] GC(4) Pause Young (Normal) (G1 Evacuation Pause) 70M->9M(256M) 30ms\n"
    )
    (logs / "gc.log.0").write_text(  # a rotated file counts too
        "[999000ms] GC(0) Pause Young (Normal) (G1 Evacuation Pause) 60M->9M(256M) 8ms\n"
    )
    got = broker_gc.broker_pauses([logs], 1000.0, 1005.0)
    assert got == {
        "count": 3,
        "total_ms": 17.8,
        "max_ms": 12.5,
        "long": [[2.0, "Pause Young (Normal) (G1 Evacuation Pause)", 12.5]],
    }
    assert broker_gc.broker_pauses([logs], 998.0, 1000.0)["long"] == [
        [1.0, "Pause Young (Normal) (G1 Evacuation Pause)", 8.0]
    ]
    assert broker_gc.broker_pauses([tmp_path / "missing"], 0, 2e9)["count"] == 0
    # The heap before -> after (size) travels with each pause (probe_broker_heap prints it)
    first = broker_gc.parse_pauses((logs / "gc.log").read_text().splitlines())[0]
    assert (first.at_ms, first.ms, first.heap) == (1000500, 4.321, "60M->9M(256M)")

"""Benchmark statistics and report generation from sample JSON lines (no services)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import render, report, results
from bench.machine import steal_pct
from bench.output import Emitter
from bench.stats import median, percentiles


def test_percentiles_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 101)]  # 1..100
    got = percentiles(reversed(samples), [0, 50, 99, 100])
    assert got == {0: 1.0, 50: 50.0, 99: 99.0, 100: 100.0}
    assert percentiles([7.0], [50, 99, 100]) == {50: 7.0, 99: 7.0, 100: 7.0}
    assert percentiles([1, 2, 3, 1000])[99] == 1000.0


def test_percentiles_reject_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty sample set"):
        percentiles([], [50])
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        percentiles([1.0], [101])


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200))
def test_percentiles_are_samples_and_monotonic(samples: list[float]) -> None:
    got = percentiles(samples, [0, 25, 50, 90, 99, 100])
    values = list(got.values())
    assert all(v in samples for v in values)
    assert values == sorted(values)
    assert got[0] == min(samples)
    assert got[100] == max(samples)


def test_median_odd_even() -> None:
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 2, 3]) == 2.5
    with pytest.raises(ValueError, match="empty sequence"):
        median([])


def test_steal_pct() -> None:
    before = {"user": 100, "idle": 800, "steal": 100}
    after = {"user": 200, "idle": 1500, "steal": 300}
    assert steal_pct(before, after) == 20.0
    assert steal_pct({}, after) is None


def test_emitter_writes_machine_facts_once_then_measurements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QYWX_BENCH_RUN_ID", "run-x")
    monkeypatch.setenv("QYWX_BENCH_QUICK", "1")
    out = tmp_path / "out.jsonl"
    with out.open("w") as stream:
        emitter = Emitter(stream)
        emitter.emit(bench="b", case="c", metric="throughput", value=5, unit="records/s", run=0)
        emitter.emit(bench="b", case="c", metric="throughput", value=6, unit="records/s", run=1)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["machine", "measurement", "measurement"]
    facts = lines[0]
    assert facts["nproc"] >= 1
    assert facts["mem_total_bytes"] > 0
    assert facts["python"]
    assert facts["librdkafka"]
    assert facts["kafka"]
    assert all(line["run_id"] == "run-x" for line in lines)
    assert lines[1]["mode"] == "quick"
    assert "ts" in lines[1]
    assert "load1" in lines[1]


# ---------------------------------------------------------------------------------------
# normalize / summarize


def _m(case: str, metric: str, value: float, run: int, **extra: Any) -> dict[str, Any]:
    unit = extra.pop("unit", "records/s")
    return {
        "kind": "measurement",
        "bench": extra.pop("bench", "kafka_ceiling"),
        "case": case,
        "metric": metric,
        "value": value,
        "unit": unit,
        "run": run,
        "run_id": extra.pop("run_id", "R1"),
        "ts": 1.0 + run,
        "load1": 2.0 + run,
        "extra": {"elapsed_s": 1.5 + run},
        **extra,
    }


def test_normalize_conforming_line_keeps_context_but_not_volatile_fields() -> None:
    [m] = results.normalize(_m("raw_produce", "throughput", 100.0, 0, record_size=1024), "x")
    assert (m.bench, m.case, m.metric, m.unit, m.value, m.run) == (
        "kafka_ceiling",
        "raw_produce",
        "throughput",
        "records/s",
        100.0,
        0,
    )
    assert m.dims == (("record_size", "1024"),)  # ts, load1, run_id, extra are not dimensions


def test_normalize_legacy_line_reads_metrics_by_suffix_and_skips_summaries() -> None:
    legacy = {
        "bench": "ingest_producer",
        "messages": 50000,
        "failed": 0,
        "page": 1000,
        "concurrency": 4,
        "elapsed_s": 9.1,
        "msg_per_s": 5500,
        "delivery_p50_ms": 12.5,
        "delivery_p99_ms": 40.0,
        "run": 2,
        "envelope_bytes": 1010,
        "topic": "bench-ingest-1234",
    }
    got = {m.metric: m for m in results.normalize(legacy, "ingest_producer")}
    assert set(got) == {"msg_per_s", "delivery_p50_ms", "delivery_p99_ms"}
    assert got["msg_per_s"].unit == "msg/s"
    assert got["msg_per_s"].value == 5500
    assert got["delivery_p99_ms"].unit == "ms"
    assert dict(got["msg_per_s"].dims) == {
        "concurrency": "4",
        "envelope_bytes": "1010",
        "page": "1000",
    }
    latency = {
        "bench": "consume_latency",
        "handler": "trivial",
        "rate_msg_per_s": 2000.0,
        "samples": 19987,
        "p99_ms": 41.0,
        "note": "worst host",
    }
    [m] = results.normalize(latency, "consume")
    assert (m.case, m.metric, m.unit, m.value) == ("consume_latency", "p99_ms", "ms", 41.0)
    assert dict(m.dims) == {"handler": "trivial", "note": "worst host", "rate_msg_per_s": "2000.0"}
    assert results.normalize({"bench": "ingest_producer_summary", "median_msg_per_s": 1}, "x") == []
    assert results.normalize({"kind": "machine", "nproc": 2}, "x") == []


def test_summarize_medians_min_max_across_runs() -> None:
    ms = [
        m
        for i, v in enumerate([30.0, 10.0, 20.0])
        for m in results.normalize(_m("raw_consume", "throughput", v, i), "x")
    ]
    [row] = results.summarize(ms)
    assert (row.median, row.min, row.max, row.runs) == (20.0, 10.0, 30.0, 3)


# ---------------------------------------------------------------------------------------
# Whole report from sample files


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def sample_results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    (results / "machine.json").write_text(
        json.dumps(
            {
                "run_id": "R1",
                "mode": "full",
                "facts": {"nproc": 2, "mem_total_bytes": 24 * 2**30, "ray": "2.60.0"},
            }
        )
    )
    ceiling = [
        {"kind": "machine", "nproc": 2, "run_id": "R1"},
        *(_m("raw_produce", "throughput", v, i) for i, v in enumerate([100e3, 90e3, 110e3])),
        *(_m("raw_consume", "throughput", v, i) for i, v in enumerate([200e3, 180e3, 220e3])),
        *(
            _m("raw_produce", "latency_p99", v, i, unit="ms")
            for i, v in enumerate([40.0, 50.0, 60.0])
        ),
        {"kind": "harness", "bench": "kafka_ceiling", "status": "ok", "returncode": 0},
    ]
    _write_jsonl(results / "kafka_ceiling.jsonl", ceiling)
    consume = [
        _m("hosted", "throughput", v, i, bench="consume", stage="consume", users=1000)
        for i, v in enumerate([50e3, 40e3, 45e3])
    ]
    consume.append({"kind": "harness", "bench": "consume", "status": "ok", "returncode": 0})
    _write_jsonl(results / "consume.jsonl", consume)
    broken = [
        "not json at all",
        json.dumps({"kind": "error", "case": "x", "run": 0, "error": "broker went away"}),
        json.dumps(
            {
                "kind": "harness",
                "bench": "callback",
                "status": "timeout",
                "returncode": -15,
                "stderr_tail": "Traceback ...\nTimeoutError: stuck",
            }
        ),
    ]
    (results / "callback.jsonl").write_text("\n".join(broken) + "\n")
    legacy = [
        {"bench": "ingest_producer", "run": i, "page": 1000, "msg_per_s": v, "run_id": "R1"}
        for i, v in enumerate([30e3, 25e3, 35e3])
    ]
    _write_jsonl(results / "ingest_producer.jsonl", legacy)
    return results


def test_report_tables_ceilings_failures_and_machine(sample_results: Path) -> None:
    out = sample_results.parent / "REPORT.md"
    report.write_report(sample_results, out)
    text = out.read_text()
    # Machine facts and the harness status of every bench.
    assert "| nproc | 2 |" in text
    assert "24.0 GiB" in text
    assert "| ray | 2.60.0 |" in text
    assert "| callback | - | timeout | -15 |" in text
    # Each bench says which harness run its figures come from.
    assert "| consume | `R1` | ok |" in text
    assert "TimeoutError: stuck" in text
    assert "broker went away" in text
    # Medians with min/max, ceiling first.
    assert text.index("## kafka_ceiling") < text.index("## consume")
    assert "| raw_produce |" in text
    assert "| 100,000 | 90,000 | 110,000 |" in text
    assert "| 50.0 | 40.0 | 60.0 | ms |" in text
    # The consume stage is read against the consume ceiling of the same run: 45k / 200k.
    consume_row = next(
        line for line in text.splitlines() if line.startswith("| hosted |") and "records/s" in line
    )
    assert "| 45,000 | 40,000 | 50,000 |" in consume_row
    assert "22% of raw_consume (200,000 records/s)" in consume_row
    assert "[other run]" not in consume_row
    assert "users=1000" in text
    # A legacy line (no metric/value) from an ingest bench is read against the produce one.
    ingest_row = next(line for line in text.splitlines() if "| msg_per_s |" in line)
    assert "| 30,000 | 25,000 | 35,000 | msg/s |" in ingest_row
    assert "30% of raw_produce (100,000 records/s)" in ingest_row


def test_ceiling_from_another_run_is_flagged(sample_results: Path) -> None:
    path = sample_results / "consume.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if line.get("kind") == "measurement":
            line["run_id"] = "R0"
    _write_jsonl(path, lines)
    machine, benches = results.load_results(sample_results)
    text = render.render_report(machine, benches)
    assert "[other run]" in text


def test_report_without_matplotlib_still_written(
    sample_results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = sample_results.parent / "REPORT.md"
    report.write_report(sample_results, out)
    assert not list(sample_results.glob("*.png"))
    text = out.read_text()
    assert "install the `bench` extra" in text
    assert "## kafka_ceiling" in text


def test_report_charts_when_matplotlib_present(sample_results: Path) -> None:
    pytest.importorskip("matplotlib")
    out = sample_results.parent / "REPORT.md"
    report.write_report(sample_results, out)
    assert (sample_results / "kafka_ceiling_throughput.png").exists()
    assert "](results/kafka_ceiling_throughput.png)" in out.read_text()

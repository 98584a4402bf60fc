"""The peer bench's pure parts: PeerBench's output, the ours/peer ratio, the report section."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import peer_tools, render, results
from bench.peer_tools import PeerError, parse_peer_line, parse_peer_output, ratio, work_spec


def result_line(**over: Any) -> str:
    record: dict[str, Any] = {
        "event": "result",
        "case": "trivial-c128",
        "run": 0,
        "status": "ok",
        "concurrency": 128,
        "work": "none",
        "commit_mode": "PERIODIC_CONSUMER_ASYNCHRONOUS",
        "expected": 50000,
        "started": 50000,
        "processed": 50000,
        "elapsed_s": 2.5,
        "throughput": 20000.0,
        "order_violations": 0,
        "committed": 50000,
        "close_s": 0.4,
        "paused_partitions": 0,
        "load1": 3.25,
        "detail": "",
    }
    record.update(over)
    return json.dumps(record)


def test_parse_output_keeps_results_and_skips_everything_else() -> None:
    stdout = "\n".join(
        [
            "SLF4J(W): something a logger printed to stdout",
            result_line(),
            "{not json",
            json.dumps({"event": "progress", "processed": 10}),
            result_line(case="sleep_5ms-c64", run=1, concurrency=64, throughput=9000.5),
            "",
        ]
    )
    runs = parse_peer_output(stdout)
    assert [(r.case, r.run, r.concurrency) for r in runs] == [
        ("trivial-c128", 0, 128),
        ("sleep_5ms-c64", 1, 64),
    ]
    assert runs[1].throughput == 9000.5
    assert runs[0].ok
    assert runs[0].fully_committed
    assert runs[0].load1 == 3.25


def test_a_stalled_run_is_not_ok_and_keeps_its_evidence() -> None:
    run = parse_peer_line(
        result_line(
            status="stalled",
            started=128,
            processed=0,
            committed=0,
            paused_partitions=4,
            detail="no progress for 30.0 s at 0/2000",
        )
    )
    assert run is not None
    assert not run.ok
    assert not run.fully_committed
    assert run.paused_partitions == 4
    assert "no progress" in run.detail


def test_ok_status_with_missing_records_or_commits_is_not_ok() -> None:
    short = parse_peer_line(result_line(processed=49999))
    uncommitted = parse_peer_line(result_line(committed=49000))
    assert short is not None
    assert not short.ok
    assert uncommitted is not None
    assert uncommitted.ok
    assert not uncommitted.fully_committed


@pytest.mark.parametrize(
    "over",
    [{"throughput": "fast"}, {"processed": None}, {"case": 7}, {"run": True}],
)
def test_a_malformed_result_line_is_an_error_not_a_number(over: dict[str, Any]) -> None:
    with pytest.raises(PeerError):
        parse_peer_line(result_line(**over))


def test_a_result_line_missing_a_field_is_an_error() -> None:
    record = json.loads(result_line())
    del record["committed"]
    with pytest.raises(PeerError, match="committed"):
        parse_peer_line(json.dumps(record))


def test_negative_load_is_unknown() -> None:
    run = parse_peer_line(result_line(load1=-1.0))
    assert run is not None
    assert run.load1 is None


def test_ratio() -> None:
    assert ratio(30_000.0, 15_000.0) == 2.0
    assert ratio(None, 15_000.0) is None
    assert ratio(30_000.0, None) is None
    assert ratio(30_000.0, 0.0) is None  # a peer that did nothing has no ratio


def test_work_spec_maps_our_handlers() -> None:
    assert work_spec("trivial") == "none"
    assert work_spec("sleep_5ms") == "sleep5"
    assert work_spec("random_0_5ms") == "random0-5"
    with pytest.raises(PeerError):
        work_spec("sleep_forever")


def test_versions_come_from_the_pom() -> None:
    versions = peer_tools.peer_versions()
    assert versions["parallel_consumer"] == "0.5.3.2"
    assert versions["kafka_clients"].startswith("3.")


def test_command_lists_every_case() -> None:
    argv = peer_tools.peer_command(
        Path("/libs"),
        Path("/classes"),
        bootstrap="127.0.0.1:1",
        topic="t",
        records=10,
        cases=[("trivial-c64", 64, "none"), ("sleep_5ms-c128", 128, "sleep5")],
        repeat=3,
        warmup=1,
        commit_mode="PERIODIC_CONSUMER_ASYNCHRONOUS",
        stall_s=30,
        timeout_s=300,
    )
    assert argv[argv.index("-cp") + 1] == "/classes:/libs/*"
    cases = [argv[i + 1] for i, a in enumerate(argv) if a == "--case"]
    assert cases == ["trivial-c64:64:none", "sleep_5ms-c128:128:sleep5"]


def test_cached_jars_are_not_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QYWX_CACHE_DIR", str(tmp_path))
    libs = peer_tools.peer_cache_dir() / "libs"
    libs.mkdir(parents=True)
    (libs / ".complete").write_text("{}")

    def no_subprocess(*a: Any, **k: Any) -> Any:
        raise AssertionError("a cached fetch must not run Maven")

    monkeypatch.setattr(peer_tools.subprocess, "run", no_subprocess)
    assert peer_tools.ensure_peer_jars() == libs


# ---------------------------------------------------------------------------------------
# The report section


def measurement(bench: str, case: str, value: float, run: int, **dims: Any) -> str:
    return json.dumps(
        {
            "bench": bench,
            "case": case,
            "metric": "throughput",
            "value": value,
            "unit": "msg/s",
            "run": run,
            "stage": "consume",
            **dims,
        }
    )


def write_results(tmp_path: Path) -> Path:
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    peer = [
        json.dumps(
            {
                "kind": "peer_context",
                "bench": "peer_parallel_consumer",
                "ours_num_hosts": 2,
                "ours_handler_concurrency": 64,
                "ours_concurrency": 128,
                "parallel_consumer_version": "0.5.3.2",
                "kafka_clients_version": "3.7.1",
                "commit_mode": "PERIODIC_CONSUMER_ASYNCHRONOUS",
                "ordering": "KEY",
            }
        )
    ]
    for run, (t64, t128, s128) in enumerate(
        [(9000, 10000, 8000), (11000, 12000, 9000), (10000, 8000, 7000)]
    ):
        for handler, conc, value in (
            ("trivial", 64, t64),
            ("trivial", 128, t128),
            ("sleep_5ms", 128, s128),
        ):
            peer.append(
                measurement(
                    "peer_parallel_consumer",
                    f"parallel_consumer_{handler}_c{conc}",
                    value,
                    run,
                    pipeline="parallel_consumer",
                    handler=handler,
                    concurrency=conc,
                    scenario="consume",
                )
            )
        peer.append(
            measurement(
                "peer_parallel_consumer",
                "parallel_consumer_random_0_5ms_c100",
                4000 + 100 * run,
                run,
                handler="random_0_5ms",
                concurrency=100,
                scenario="published",
            )
        )
    (results_dir / "peer_parallel_consumer.jsonl").write_text("\n".join(peer) + "\n")
    ours = [
        measurement("consume", "hosted_trivial", v, run, pipeline="hosted", handler="trivial")
        for run, v in enumerate([20000, 21000, 22000])
    ] + [
        measurement("consume", "hosted_sleep_5ms", v, run, pipeline="hosted", handler="sleep_5ms")
        for run, v in enumerate([16000, 18000, 17000])
    ]
    (results_dir / "consume.jsonl").write_text("\n".join(ours) + "\n")
    return results_dir


def test_comparisons_pair_same_handler_and_total_concurrency(tmp_path: Path) -> None:
    _, benches = results.load_results(write_results(tmp_path))
    all_rows = {b.name: results.summarize(b.measurements) for b in benches}
    peer = next(b for b in benches if b.name == "peer_parallel_consumer")
    got = render.peer_comparisons(all_rows, peer.sections["peer_context"])
    by_case = {(c.handler, c.concurrency): c for c in got}
    assert set(by_case) == {("trivial", 64), ("trivial", 128), ("sleep_5ms", 128)}
    # ours 21,000 (median) / peer 10,000 (median); 64 has no counterpart (ours runs 128)
    assert by_case[("trivial", 128)].ratio == pytest.approx(2.1)
    assert by_case[("sleep_5ms", 128)].ratio == pytest.approx(17000 / 8000)
    assert by_case[("trivial", 64)].ours is None
    assert by_case[("trivial", 64)].ratio is None


def test_report_renders_the_peer_section(tmp_path: Path) -> None:
    machine, benches = results.load_results(write_results(tmp_path))
    text = render.render_report(machine, benches)
    assert "Ours vs Confluent Parallel Consumer" in text
    assert "2 hosts × 64 handlers per host = 128" in text
    assert (
        "| trivial | 128 | 10,000 (8,000–12,000) | 21,000 (20,000–22,000) | **2.10×** | 3/3 |"
        in text
    )
    assert "| trivial | 64 |" in text
    assert "- (ours runs 128; `bench_consume --only concurrency --peer-concurrency 64`" in text
    assert "**4,100 msg/s** here" in text


def test_ours_at_the_peers_other_concurrency_pairs_with_it(tmp_path: Path) -> None:
    """`bench_consume --only concurrency` writes hosted_<handler>_c<N>: it pairs with the
    peer's case at N, and the hosted pipeline's own total (128) still pairs at 128."""
    results_dir = write_results(tmp_path)
    consume = results_dir / "consume.jsonl"
    c64 = [
        measurement(
            "consume",
            "hosted_trivial_c64",
            v,
            run,
            pipeline="hosted",
            handler="trivial",
            concurrency=64,
        )
        for run, v in enumerate([4500, 5000, 5500])
    ] + [  # --peer-concurrency 128 too: the hosted run's own drain keeps the 128 pair
        measurement(
            "consume",
            "hosted_trivial_c128",
            1,
            run,
            pipeline="hosted",
            handler="trivial",
            concurrency=128,
        )
        for run in range(3)
    ]
    consume.write_text(consume.read_text() + "\n".join(c64) + "\n")
    machine, benches = results.load_results(results_dir)
    all_rows = {b.name: results.summarize(b.measurements) for b in benches}
    peer = next(b for b in benches if b.name == "peer_parallel_consumer")
    by_case = {
        (c.handler, c.concurrency): c
        for c in render.peer_comparisons(all_rows, peer.sections["peer_context"])
    }
    assert by_case[("trivial", 64)].ratio == pytest.approx(5000 / 10000)
    assert by_case[("trivial", 128)].ratio == pytest.approx(2.1)  # not the c64/c128 rows
    text = render.render_report(machine, benches)
    row = "| trivial | 64 | 10,000 (9,000–11,000) | 5,000 (4,500–5,500) | **0.50×** | 3/3 |"
    assert row in text


def test_a_ratio_across_harness_runs_is_marked(tmp_path: Path) -> None:
    results_dir = write_results(tmp_path)
    consume = results_dir / "consume.jsonl"
    lines = [json.loads(x) for x in consume.read_text().splitlines()]
    consume.write_text("\n".join(json.dumps({**x, "run_id": "older"}) for x in lines) + "\n")
    machine, benches = results.load_results(results_dir)
    assert "**2.10×** [other run]" in render.render_report(machine, benches)


def test_no_peer_results_no_peer_section(tmp_path: Path) -> None:
    results_dir = write_results(tmp_path)
    (results_dir / "peer_parallel_consumer.jsonl").unlink()
    machine, benches = results.load_results(results_dir)
    assert "Confluent Parallel Consumer" not in render.render_report(machine, benches)


def test_a_peer_without_ours_says_why(tmp_path: Path) -> None:
    results_dir = write_results(tmp_path)
    (results_dir / "consume.jsonl").unlink()
    machine, benches = results.load_results(results_dir)
    text = render.render_report(machine, benches)
    assert "| trivial | 128 |" in text
    assert "no `consume` hosted drain" in text


@pytest.mark.slow
def test_peer_program_fetches_and_compiles() -> None:
    """Maven fetches Parallel Consumer (cached after the first time) and javac compiles
    bench/peer/PeerBench.java against it."""
    libs, classes = peer_tools.ensure_peer()
    assert any(libs.glob("parallel-consumer-core-*.jar"))
    assert any(libs.glob("kafka-clients-*.jar"))
    assert (classes / "PeerBench.class").exists()

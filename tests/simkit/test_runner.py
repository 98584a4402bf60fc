"""The shared simulator runner, through both CLIs, in the forms their READMEs show
(tests/sim/README.md, tests/sim_ingest/README.md), on a few seeds each."""

from __future__ import annotations

import pytest

from tests.sim import run as consume_run
from tests.sim_ingest import run as ingest_run
from tests.simkit import runner


@pytest.mark.parametrize(
    ("cli_main", "argv"),
    [
        (consume_run.main, ["--seeds", "0:4", "--jobs", "2"]),
        (consume_run.main, ["--seeds", "0:3", "--list"]),
        (consume_run.main, ["--seed", "7", "--trace"]),
        (consume_run.main, ["--seeds", "0:2", "--without", "queue_full,breaker,cancel,process"]),
        (ingest_run.main, ["--seeds", "0:4", "--jobs", "2"]),
        (ingest_run.main, ["--seeds", "0:3", "--list"]),
        (ingest_run.main, ["--seed", "7", "--trace"]),
        (ingest_run.main, ["--seeds", "0:2", "--without", "pause,stalls,redis_slow"]),
    ],
)
def test_documented_commands_run(
    cli_main: object, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(argv) == 0  # type: ignore[operator]
    out = capsys.readouterr().out
    if "--seed" in argv:
        assert "seed 7 ok" in out
        assert "scenario: " in out
        assert "--trace" not in argv or out.count("\n") > 50  # every event printed
    else:
        n = len(runner.parse_range(argv[1]))
        assert f"{n} seeds in " in out
        assert ", 0 failed" in out


def test_consume_summary_keeps_its_drain_pin_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert consume_run.main(["--seeds", "0:2"]) == 0
    assert "max drain pin " in capsys.readouterr().out


def test_unknown_fault_kind_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        ingest_run.main(["--seeds", "0:1", "--without", "no_such_fault"])
    assert exc.value.code == 2


def test_a_failing_seed_is_listed_reported_and_fails_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bound no run can meet makes every seed fail: the exit code says so, --list
    prints one line per seed, the summary counts them by invariant."""
    assert ingest_run.main(["--seeds", "5:7", "--list", "--stall-bound", "0"]) == 1
    out = capsys.readouterr().out
    assert "seed 5: stalled" in out
    assert "seed 6: stalled" in out
    assert "2 seeds in " in out
    assert "2 failed" in out
    assert "stalled: 2 seeds" in out
    assert ingest_run.main(["--seeds", "5:6", "--stall-bound", "0"]) == 1
    out = capsys.readouterr().out
    assert "replay: python -m tests.sim_ingest.run --seed 5 --trace" in out


def test_the_deadline_stops_starting_seeds() -> None:
    results = list(ingest_run.CLI.run_many(range(0, 1000), deadline_s=0.0))
    assert results == []

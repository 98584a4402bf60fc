"""Pure logic of the pipeline benches (profiles, stress): process groups, latency windows,
stamp audits, the stress verdict, the harness's timeouts, the report sections, and the
simulator and handler hooks they rely on. No services."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from bench import charts, machine, render, results
from bench.bench_profiles import (
    PROFILES,
    audit_stamps,
    letters_by_reason,
    rss_split,
    window_stats,
)
from bench.bench_stress import (
    censored_percentile,
    profile_targets,
    refine_between,
    refine_rate,
    retry_step,
    step_rates,
    step_verdict,
)
from bench.procs import (
    ProcSample,
    classify_process,
    cpu_by_group,
    descendants,
    hottest_pid,
    parse_proc_stat,
    parse_smaps_rollup,
    proc_memory,
    rss_by_group,
    thread_count,
)
from bench.pyspy import speedscope_top
from bench.run_all import declared_timeout, timeout_for
from qywx_ray.devstack import pipeline as devpipe
from qywx_ray.devstack.pipeline import Stamp, parse_stamps
from qywx_ray.testing.wecomsim import (
    Population,
    PopulationConfig,
    WeComSimulator,
    WeComSimulatorState,
    make_app,
)
from qywx_ray.wecom.settings import WeComSettings

# ------------------------------------------------------------------ process groups


@pytest.mark.parametrize(
    ("cmdline", "group"),
    [
        ("/usr/bin/java -Xmx384m -cp /x/libs/* kafka.Kafka /tmp/server.properties", "kafka"),
        ("/usr/bin/redis-server 127.0.0.1:6379", "redis"),
        ("python -m qywx_ray.testing.wecomsim --host 127.0.0.1", "simulator"),
        ("/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp", "ray_gcs"),
        ("/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "ray_raylet"),
        ("ray::PartitionConsumer", "consumer"),
        ("ray::UserHost.deliver", "hosts"),
        ("ray::SyncerHost", "syncer"),
        ("ray::ServeReplica:qywx-p1:Ingress", "serve"),
        ("ray::ProxyActor", "serve"),
        ("ray::DLQRecoveryActor", "dlq"),
        ("ray::IDLE", "ray_idle_workers"),
        ("ray::SomethingElse", "ray_other_actors"),
        ("ray::DashboardAgent", "ray_other"),
        ("/usr/bin/python /site-packages/ray/dashboard/agent.py", "ray_other"),
        ("bash -c sleep 1", "other"),
    ],
)
def test_classify_process(cmdline: str, group: str) -> None:
    assert classify_process(cmdline) == group
    assert classify_process(cmdline, driver=True) == "bench_driver"


def test_parse_proc_stat_survives_spaces_and_parens_in_comm() -> None:
    fields = ["S", "41", "1", "1", "0", "-1", "0", "0", "0", "0", "0", "250", "30"]
    text = "123 (ray::User Host) (x)) " + " ".join(fields) + " 20 0 1 0 5 6 7"
    assert parse_proc_stat(text) == (41, 280)


def test_busy_pct_is_the_whole_machine_in_percent_of_one_core() -> None:
    """Idle and iowait are not busy, stolen time is not ours at all; the share is scaled
    to the CPUs (200 = both of 2)."""
    before = {"user": 100, "system": 50, "idle": 800, "iowait": 50, "steal": 0}
    after = {"user": 160, "system": 90, "idle": 880, "iowait": 70, "steal": 0}
    # 200 jiffies passed, 100 of them busy: half of both cores = one core.
    assert machine.busy_pct(before, after, cpus=2) == 100.0
    stolen = {**after, "steal": 200}  # as many jiffies stolen again: still one core busy
    assert machine.busy_pct(before, stolen, cpus=2) == 100.0
    assert machine.steal_pct(before, stolen) == 50.0
    assert machine.busy_pct({}, after) is None
    assert machine.busy_pct(after, after) is None


SMAPS_ROLLUP = """\
00400000-7ffd1a2b3000 ---p 00000000 00:00 0                              [rollup]
Rss:              118272 kB
Pss:               70400 kB
Pss_Anon:          60000 kB
Pss_File:          10400 kB
Shared_Clean:      48000 kB
Shared_Dirty:        100 kB
Private_Clean:      2000 kB
Private_Dirty:     68000 kB
Referenced:       118000 kB
Anonymous:         68000 kB
"""


def test_parse_smaps_rollup_reads_rss_pss_and_private_memory() -> None:
    """Pss is not Pss_Anon or Pss_File, USS is Private_Clean + Private_Dirty."""
    assert parse_smaps_rollup(SMAPS_ROLLUP) == {
        "rss": 118272 * 1024,
        "pss": 70400 * 1024,
        "uss": (2000 + 68000) * 1024,
    }
    mem = proc_memory(os.getpid())  # and the live file parses
    assert 0 < mem["uss"] <= mem["pss"] <= mem["rss"]
    assert thread_count(os.getpid()) >= 1


def test_descendants_follow_the_tree_and_ignore_strangers() -> None:
    parents = {10: 1, 11: 10, 12: 11, 13: 12, 20: 1, 21: 20, 30: 13}
    assert descendants([10], parents) == {10, 11, 12, 13, 30}
    assert descendants([10, 20], parents) == {10, 11, 12, 13, 20, 21, 30}
    assert descendants([99], parents) == set()


def _s(pid: int, ticks: int, rss: int = 0, cmd: str = "") -> ProcSample:
    return ProcSample(pid, 1, cmd, ticks, rss)


def test_cpu_rss_and_hottest_by_group() -> None:
    groups = {1: "kafka", 2: "hosts", 3: "hosts", 4: "serve", 5: "consumer"}
    before = [_s(1, 0), _s(2, 100), _s(3, 100), _s(4, 0)]
    # 10 s at 100 ticks/s: kafka used 5 s (50 %), hosts 3 s + 1 s, serve 2 s; pid 5 is new.
    after = [_s(1, 500, 300), _s(2, 400, 100), _s(3, 200, 100), _s(4, 200, 50), _s(5, 999, 7)]
    cpu = cpu_by_group(before, after, 10.0, groups, clk_tck=100)
    assert cpu == {"kafka": 50.0, "hosts": 40.0, "serve": 20.0}
    assert list(cpu) == ["kafka", "hosts", "serve"]  # busiest first
    assert rss_by_group(after, groups) == {"kafka": 300, "hosts": 200, "serve": 50, "consumer": 7}
    assert hottest_pid(before, after, groups, python_only=False) == (1, "kafka", 500)
    assert hottest_pid(before, after, groups, python_only=True) == (2, "hosts", 300)
    with pytest.raises(ValueError, match="elapsed_s must be positive"):
        cpu_by_group(before, after, 0.0, groups)


def test_rss_split_separates_ray_from_the_stack() -> None:
    mib = 1024 * 1024
    rss = {"kafka": 300 * mib, "redis": 10 * mib, "hosts": 200 * mib, "bench_driver": 5 * mib}
    assert rss_split(rss) == {"ray": 200.0, "stack": 310.0, "driver": 5.0}


def test_speedscope_top_sums_lines_of_one_function() -> None:
    data = {
        "shared": {
            "frames": [
                {"name": "main", "file": "a.py", "line": 1},
                {"name": "hot", "file": "b.py", "line": 10},
                {"name": "hot", "file": "b.py", "line": 11},
                {"name": "cold", "file": "c.py", "line": 5},
            ]
        },
        "profiles": [
            {"samples": [[0, 1], [0, 2], [0, 3], []], "weights": [2, 1, 1, 0]},
            {"samples": [[0, 1]]},  # no weights: 1 each
        ],
    }
    top = speedscope_top(data)
    assert top[0] == {"function": "hot", "file": "b.py", "self_pct": 80.0}
    assert top[1] == {"function": "cold", "file": "c.py", "self_pct": 20.0}
    assert speedscope_top({"shared": {"frames": []}, "profiles": []}) == []


# ------------------------------------------------------------------ profiles


def test_profiles_are_the_seeds() -> None:
    assert PROFILES["normal"].offered_msg_s == pytest.approx(1000 * 2 / 60)
    assert PROFILES["peak"].offered_msg_s == pytest.approx(100)
    assert PROFILES["attack"].offered_msg_s == pytest.approx(1000 * 2 / 60 + 10 * 1000 / 60)
    groups = PROFILES["peak"].user_groups()
    assert len(groups) == 100
    assert set(groups.values()) == {"vip"}
    assert PROFILES["attack"].user_groups() == {}  # attackers meet the default rule
    args = PROFILES["attack"].sim_args()
    assert "--stamp-created-ms" in args
    assert args[args.index("--attackers") + 1] == "10"


def _stamp(user: str, mid: str, created: int, start: int) -> Stamp:
    return Stamp(user, mid, created, start)


def test_window_stats_latency_split_and_first_calls_only() -> None:
    stamps = [
        _stamp("wmSIMUSER1", "a", 900, 950),  # created before the window: no latency
        _stamp("wmSIMUSER1", "b", 1000, 1100),
        _stamp("wmSIMUSER2", "c", 1500, 1700),
        _stamp("wmSIMATTACK000001", "d", 1600, 2600),
        _stamp("wmSIMUSER1", "b", 1000, 1900),  # a replay of b: not a second latency
        _stamp("wmSIMUSER3", "e", 1990, 2500),  # handled after the window: latency counts
        _stamp("wmSIMUSER3", "f", -1, 1200),  # no creation stamp
    ]
    ws = window_stats(stamps, 1000, 2000)
    assert ws.duration_s == 1.0
    assert ws.processed == 3  # b, c, f started inside; the replay of b is not a new one
    assert ws.calls == 4
    assert ws.latency["normal"].n == 3
    assert ws.latency["normal"].max_ms == 510.0
    assert ws.latency["attackers"].n == 1
    assert ws.latency["attackers"].p99_ms == 1000.0
    assert ws.latency["all"].n == 4
    assert ws.latency["all"].p50_ms == 200.0
    with pytest.raises(ValueError, match="empty window"):
        window_stats(stamps, 5, 5)
    # A message the DLQ retried a minute later is kept out of the direct-path figures.
    retried = window_stats(
        [*stamps, _stamp("wmSIMUSER4", "g", 1100, 61_100)], 1000, 2000, via_dlq={"g", "d"}
    )
    assert retried.latency["via_dlq"].n == 2
    assert retried.latency["via_dlq"].max_ms == 60_000.0
    assert retried.latency["all"].max_ms == 510.0
    assert retried.latency["attackers"].n == 0


def test_audit_stamps_finds_loss_reorder_and_duplicates() -> None:
    truth = {"kf": {"u1": ["1", "2", "3"], "u2": ["4", "5"], "u3": ["6", "7"]}}
    stamps = [
        _stamp("u1", "1", 0, 1),
        _stamp("u1", "3", 0, 2),  # 2 is dead-lettered, then retried out of line: fine
        _stamp("u1", "2", 0, 3),
        _stamp("u2", "5", 0, 4),  # reordered: 5 before 4
        _stamp("u2", "4", 0, 5),
        _stamp("u3", "6", 0, 6),
        _stamp("u3", "6", 0, 7),  # a duplicate call
    ]
    audit = audit_stamps(truth, stamps, dead={"2"})
    assert audit.as_dict() == {
        "messages": 7,
        "processed": 6,
        "dead_lettered": 0,  # 2 came back and was handled
        "unaccounted": 1,  # 7
        "reordered_users": 1,
        "duplicated_calls": 1,
    }
    clean = audit_stamps({"kf": {"u": ["1", "2"]}}, [_stamp("u", "1", 0, 1)], dead={"2"})
    assert (clean.dead_lettered, clean.unaccounted, clean.reordered_users) == (1, 0, 0)


def test_letters_by_reason() -> None:
    bodies: list[bytes | str] = [
        json.dumps({"failure_reason": "rate_limited"}),
        json.dumps({"failure_reason": "rate_limited"}).encode(),
        json.dumps({"failure_reason": "user_blocked"}),
        "not json",
    ]
    assert letters_by_reason(bodies) == {"rate_limited": 2, "unparsable": 1, "user_blocked": 1}


# ------------------------------------------------------------------ stress


def test_refine_rate_bisects_the_gap_between_held_and_broken_steps() -> None:
    assert refine_rate(8000, 16000) == 12000
    assert refine_rate(8000, 12000) == 10000  # broke at 12,000: try the target next
    assert refine_rate(10000, 12000) == 11000  # held at 10,000
    assert refine_rate(8000, 9000) == 8500
    assert refine_rate(4000, 4250) == 4100  # rounded to the grain, still strictly between
    assert refine_rate(8000, 8100) is None  # nothing between at a 100 msg/s grain
    assert refine_rate(None, 500) is None  # the first step broke: nothing held to start from


def test_refine_between_drains_then_resumes_then_measures_and_stops_when_not_drained() -> None:
    calls: list[str] = []
    outcome = {12000.0: True, 10000.0: False}  # broke at 12,000, held at 10,000

    def step(i: int, rate: float, refined: bool) -> tuple[dict[str, Any], None]:
        calls.append(f"step {i} {rate:.0f} {refined}")
        return {"broke": outcome[rate]}, None

    def drain() -> bool:
        calls.append("drain")
        return True

    def resume_at(rate: float) -> None:
        calls.append(f"resume {rate:.0f}")

    got = refine_between(8000, 16000, 2, step, drain, resume_at)
    assert calls == [
        "drain",
        "resume 12000",
        "step 100 12000 True",
        "drain",
        "resume 10000",
        "step 101 10000 True",
    ]
    assert got == {"held_msg_s": 10000.0, "broke_msg_s": 12000.0, "tried": [12000.0, 10000.0]}

    calls.clear()
    stuck = refine_between(8000, 16000, 2, step, lambda: False, resume_at)
    assert calls == []  # nothing resumed or measured on top of an undrained backlog
    assert stuck == {
        "held_msg_s": 8000,
        "broke_msg_s": 16000,
        "tried": [],
        "stopped": "not drained",
    }
    assert refine_between(None, 500, 2, step, drain, resume_at) == {
        "held_msg_s": None,
        "broke_msg_s": 500,
        "tried": [],
    }
    assert refine_between(8000, 16000, 0, step, drain, resume_at) is None


def test_step_rates() -> None:
    assert step_rates(500, 2, 4) == [500, 1000, 2000, 4000]
    with pytest.raises(ValueError, match="factor > 1"):
        step_rates(500, 1.0, 3)


def test_censored_percentile() -> None:
    lat = [float(x) for x in range(1, 101)]
    assert censored_percentile(lat, 0, 5000.0) == (99.0, False)
    # 2 of 102 unhandled: p99 (rank 101) lands among them → only a lower bound
    assert censored_percentile(lat, 2, 3000.0) == (3000.0, True)
    # p50 is still exact: the unhandled ones are slower than every handled one
    assert censored_percentile(lat, 2, 3000.0, 50) == (51.0, False)
    assert censored_percentile([], 0, 1.0) == (None, False)
    assert censored_percentile([], 3, 1500.0) == (1500.0, True)


def test_step_verdict_names_every_reason() -> None:
    ok = step_verdict(1000, 990, 985, 400.0, 20_000, 100)
    assert ok.broke is False
    assert ok.reasons == []
    slow = step_verdict(1000, 990, 985, 1500.0, 20_000, 0)
    assert slow.broke
    assert "p99" in slow.reasons[0]
    behind = step_verdict(1000, 1000, 700, 800.0, 20_000, 5_000)
    assert len(behind.reasons) == 2
    rig = step_verdict(8000, 5000, 5000, 200.0, 100_000, 0)
    assert rig.broke
    assert "simulator" in rig.reasons[0]
    ingest = step_verdict(2000, 2000, 1900, 900.0, 40_000, 0, ingest_backlog_growth=5_000)
    assert ingest.reasons == [
        "ingest behind: 5000 more messages waiting before Kafka (callback → sync → produce)"
    ]
    assert step_verdict(2000, 2000, 1990, 900.0, 40_000, 0, 1_000).broke is False


def test_retry_step_only_once_and_only_for_latency_alone() -> None:
    spike = step_verdict(500, 500, 500, 1997.0, 22_000, 0).reasons
    assert retry_step(spike, attempt=0) is True
    assert retry_step(spike, attempt=1) is False
    behind = step_verdict(1000, 1000, 700, 3000.0, 20_000, 0).reasons
    assert retry_step(behind, attempt=0) is False
    assert retry_step([], attempt=0) is False


def test_profile_targets_hottest_component_then_hottest_single_process() -> None:
    cpu = {"kafka": 60.0, "hosts": 40.0, "syncer": 15.0, "serve": 10.0}
    busiest = {"kafka": (1, 600), "hosts": (2, 110), "syncer": (3, 150), "serve": (4, 100)}
    # Kafka is not Python; hosts is the hottest component; syncer the hottest process.
    assert profile_targets(cpu, busiest) == [(2, "hosts"), (3, "syncer")]
    busiest["hosts"] = (2, 200)
    assert profile_targets(cpu, busiest) == [(2, "hosts")]
    assert profile_targets({"kafka": 50.0}, {"kafka": (1, 5)}) == []


# ------------------------------------------------------------------ harness timeouts


def test_declared_timeout(tmp_path: Path) -> None:
    src = '"""doc"""\n# bench-timeout-s: full=1500 quick=600\nimport x\n'
    assert declared_timeout(src, quick=False) == 1500.0
    assert declared_timeout(src, quick=True) == 600.0
    assert declared_timeout("import x\n", quick=True) is None
    assert declared_timeout("# bench-timeout-s: full=abc\n", quick=False) is None
    script = tmp_path / "bench_x.py"
    script.write_text(src)
    assert timeout_for(script, True, None) == 600.0
    assert timeout_for(script, True, 42.0) == 42.0
    plain = tmp_path / "bench_y.py"
    plain.write_text("pass\n")
    assert timeout_for(plain, False, None) == 900.0
    assert timeout_for(plain, True, None) == 240.0


# ------------------------------------------------------------------ report sections


def _profile_line(name: str, p99: float, baseline: float | None = None) -> dict[str, Any]:
    return {
        "kind": "profile",
        "bench": "profiles",
        "case": name,
        "run": 0,
        "result": {
            "profile": name,
            "target_msg_s": 200.0,
            "offered_msg_s": 199.0,
            "processed_msg_s": 198.5,
            "latency": {
                "all": {"n": 10, "p50_ms": 120.0, "p99_ms": p99, "max_ms": 900.0},
                "normal": {"n": 8, "p50_ms": 110.0, "p99_ms": p99 - 50, "max_ms": 800.0},
                "via_dlq": {"n": 2 if baseline else 0, "max_ms": 60_000.0 if baseline else None},
            },
            "mailboxes": 1010,
            "ray_worker_processes": 13,
            "rss_mib": {"ray": 1950.0, "stack": 450.0},
            "cpu_pct_by_group": {"hosts": 30.0, "kafka": 15.0, "serve": 14.0, "redis": 2.0},
            "audit": {"lost": 0, "reordered": 0, "duplicated_side_effects": 0},
            "dead_letters_by_reason": {"rate_limited": 4000} if baseline else {},
            "normal_p99_without_attackers_ms": baseline,
        },
    }


def _step_line(target: float, p99: float, broke: bool) -> dict[str, Any]:
    return {
        "kind": "stress_step",
        "bench": "stress",
        "case": "step",
        "run": 0,
        "result": {
            "target_msg_s": target,
            "offered_msg_s": target,
            "processed_msg_s": target * (0.5 if broke else 1),
            "p50_ms": 100.0,
            "p99_ms": p99,
            "p99_censored": broke,
            "lag_start": 10,
            "lag_end": 5000 if broke else 8,
            "ingest_backlog_start": 3,
            "ingest_backlog_end": 9000 if broke else 4,
            "redis_cmds_s": 3000.0,
            "cpu_total_pct": 190.0,
            "cpu_pct_by_group": {"hosts": 80.0, "consumer": 40.0},
            "broke": broke,
            "reasons": ["p99 3000 ms > 1000 ms"] if broke else [],
        },
    }


def test_report_renders_profiles_and_stress_sections(tmp_path: Path) -> None:
    lines = [
        _profile_line("normal", 300.0),
        _profile_line("attack", 450.0, baseline=250.0),
        _step_line(500, 250.0, False),
        _step_line(1000, 3000.0, True),
        {
            "kind": "stress_summary",
            "bench": "stress",
            "case": "summary",
            "run": 0,
            "result": {
                "max_ok_msg_s": 500.0,
                "users": 10000,
                "handler": "noop",
                "audit": {"unaccounted": 0, "reordered_users": 0},
                "breaking": {
                    "target_msg_s": 1000.0,
                    "why": ["p99 3000 ms > 1000 ms"],
                    "busiest_groups": [["hosts", 80.0]],
                    "hottest_process": {"pid": 7, "group": "syncer"},
                    "profiles": [
                        {
                            "pid": 42,
                            "group": "hosts",
                            "path": "/x/stress_pyspy_hosts.speedscope.json",
                            "top": [
                                {"function": "deliver", "file": "/a/hosts.py", "self_pct": 12.5}
                            ],
                        },
                        {"pid": 7, "group": "syncer", "error": "py-spy exit 1: denied"},
                    ],
                },
            },
        },
    ]
    (tmp_path / "profiles.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n")
    (tmp_path / "stress.jsonl").write_text("\n".join(json.dumps(x) for x in lines[2:]) + "\n")
    machine, benches = results.load_results(tmp_path)
    by_name = {b.name: b for b in benches}
    assert len(by_name["profiles"].sections["profile"]) == 2
    assert by_name["profiles"].measurements == []  # section lines are not measurements
    text = render.render_report(machine, benches)
    assert "### Load profiles" in text
    assert (
        "| attack | 200 | 199 | 198 | 120 | 450 | 900 | 400 (without attackers: 250) | 2, 60,000 |"
        in text
    )
    assert "rate_limited 4000" in text
    assert "### Stress to breaking point" in text
    assert "| 1,000 | 1,000 | 500 | 100 | ≥ 3,000 | 3→9000 | 10→5000" in text
    assert "**Broke at 1,000 msg/s**: p99 3000 ms > 1000 ms" in text
    assert "`results/stress_pyspy_hosts.speedscope.json`" in text
    assert "| `deliver` | hosts.py | 12.5 |" in text
    assert "Busiest single process: pid 7 (`syncer`)" in text
    assert "py-spy of `syncer` failed: py-spy exit 1: denied" in text
    curve = charts.stress_curve(by_name["stress"].sections["stress_step"])
    assert [c[0] for c in curve] == [500.0, 1000.0]
    spike = _step_line(500, 1997.0, False)
    spike["result"].update(broke=True, retried=True, reasons=["p99 1997 ms > 1000 ms"])
    assert charts.stress_curve([spike, _step_line(500, 250.0, False)])[0][4] == 250.0
    assert "→ measured again" in "\n".join(render.render_stress([spike], []))
    bisected = _step_line(1200, 300.0, False)
    bisected["result"].update(refined=True)
    refined: dict[str, Any] = {"held_msg_s": 1200.0, "broke_msg_s": 1400.0, "tried": [1500, 1200]}
    summary = {"kind": "stress_summary", "result": {"refined": refined}}
    text = "\n".join(render.render_stress([bisected], [summary]))
    assert "| bisecting, after a drain: ok |" in text
    assert "Bisected after the first break (1,500, 1,200 msg/s): held at **1,200**" in text
    refined.clear()
    refined.update(tried=[], stopped="not drained")
    text = "\n".join(render.render_stress([bisected], [summary]))
    assert "Bisection stopped before its first try: not drained." in text


# ------------------------------------------------------------------ simulator + handler hooks


def _state() -> WeComSimulatorState:
    return WeComSimulatorState.from_settings(
        WeComSettings(), clock=lambda: 1_760_000_000.25, rng=random.Random(3)
    )


def test_population_stamps_creation_time_when_asked() -> None:
    state = _state()
    pop = Population(
        state,
        PopulationConfig(
            users=10,
            rate_per_min=600,
            attackers=1,
            attacker_rate_per_min=600,
            stamp_created_ms=True,
        ),
    )
    assert pop.tick(1.0) == 100 + 10  # 10 users × 10/s, 1 attacker × 10/s
    items = [json.loads(m.data) for log in state.logs.values() for m in log.messages]
    assert {i["sim_created_ms"] for i in items} == {1_760_000_000_250}
    plain = _state()
    Population(plain, PopulationConfig(users=10, rate_per_min=600)).tick(1.0)
    assert all(b"sim_created_ms" not in m.data for log in plain.logs.values() for m in log.messages)


async def test_population_rates_and_mark_endpoints() -> None:
    state = _state()
    sim = WeComSimulator(state, population=PopulationConfig(users=10, rate_per_min=60))
    transport = httpx.ASGITransport(app=make_app(sim))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        resp = await client.post("/sim/population/rates", json={"rate_per_min": 600.0})
        assert resp.status_code == 200
        assert resp.json()["rate_per_min"] == 600.0
        assert sim.population is not None
        assert sim.population.config.users == 10
        assert sim.population.tick(1.0) == 100  # the new rate applies at once
        mark = (await client.get("/sim/population/mark")).json()
        assert mark == {"messages": 100, "clock_ms": 1_760_000_000_250}
        resp = await client.post("/sim/population/pause")  # the generic route still works
        assert resp.json() == {"paused": True}
        bad = await client.post("/sim/population/rates", json={"rate_per_min": -1})
        assert bad.status_code == 422
    none = WeComSimulator(_state())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=make_app(none)), base_url="http://sim"
    ) as client:
        assert (await client.post("/sim/population/rates", json={})).status_code == 400


class FakeRedis:
    def __init__(self, fail: int = 0) -> None:
        self.lists: dict[str, list[str]] = {}
        self.calls = 0
        self.fail = fail

    async def rpush(self, key: str, *values: str) -> int:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise ConnectionError("down")
        self.lists.setdefault(key, []).extend(values)
        return len(self.lists[key])

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        return [v.encode() for v in self.lists.get(key, [])[start:]]


def _ctx(redis: FakeRedis, user: str, mid: str, raw: dict[str, Any]) -> Any:
    return SimpleNamespace(
        user_id=user, message_id=mid, redis=redis, envelope=SimpleNamespace(raw=raw)
    )


async def test_stamp_buffer_batches_and_keeps_order_through_a_redis_failure() -> None:
    redis = FakeRedis(fail=1)
    buf = devpipe._StampBuffer()
    for i in range(2500):
        buf.add(_ctx(redis, f"u{i % 3}", f"m{i}", {"sim_created_ms": 1000 + i}), 2000 + i)
    assert buf.task is not None
    await buf.flush()  # Redis down: nothing lost, nothing reordered
    assert redis.lists == {}
    assert len(buf.entries) == 2500
    await buf.flush()
    assert redis.calls == 3  # 2000 + 500: batches, never a call per message
    stamps = devpipe.read_stamps(redis)
    assert [s.message_id for s in stamps] == [f"m{i}" for i in range(2500)]
    assert stamps[7] == Stamp("u1", "m7", 1007, 2007)
    buf.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await buf.task


async def test_timed_noop_handler_stamps_missing_creation_as_minus_one() -> None:
    redis = FakeRedis()
    await devpipe.timed_noop_handler(None, _ctx(redis, "u", "m1", {}))
    await devpipe._STAMPS.flush()
    assert devpipe._STAMPS.task is not None
    devpipe._STAMPS.task.cancel()
    (stamp,) = parse_stamps(redis.lists[devpipe.STAMP_KEY])
    assert (stamp.user, stamp.message_id, stamp.created_ms) == ("u", "m1", -1)


def test_cpu_slices_show_what_ran_in_each_slice() -> None:
    from bench.procs import cpu_slices

    def scan(host_ticks: int, redis_ticks: int) -> dict[int, ProcSample]:
        return {
            10: ProcSample(10, 1, "ray::UserHost.deliver", host_ticks, 0),
            11: ProcSample(11, 1, "/usr/bin/redis-server *:6379", redis_ticks, 0),
            12: ProcSample(12, 1, "python bench", 0, 0),
        }

    # 100 ticks/s: slice 1 the host used half a core, slice 2 Redis a whole one
    scans = [(0.0, scan(0, 0)), (1.0, scan(50, 0)), (2.0, scan(50, 100)), (2.0, scan(60, 100))]
    got = cpu_slices(scans, driver_pid=12, top=1, clk_tck=100)
    assert got == [[0.0, 50.0, {"hosts": 50.0}], [1.0, 100.0, {"redis": 100.0}]]


def test_gc_delta_counts_the_window_only_and_skips_a_group_that_changed() -> None:
    from bench.bench_profiles import gc_delta

    host = {"count": [5, 1, 0], "total_ms": [1.0, 2.0, 0.0], "long": [[50.0, 2, 500.0]]}
    later = {
        "count": [9, 2, 1],
        "total_ms": [2.0, 3.0, 300.0],
        "long": [[50.0, 2, 500.0], [105.0, 2, 300.0]],
    }
    restarted = {"count": [3, 0, 0], "total_ms": [0.5, 0.0, 0.0], "long": []}
    before = {"hosts": [host], "simulator": [host], "consumers": [host]}
    after = {
        "hosts": [later],
        "simulator": [host, later],  # another process appeared
        "consumers": [restarted],  # Ray restarted it: its counters began again
    }
    assert gc_delta(before, after, 100.0, 110.0) == {
        "hosts": {"ms": 302.0, "full": 1, "longest_ms": 300.0}  # the 500 ms pause was before
    }


class _RewritingRedis:
    """A Redis whose AOF rewrite is scheduled first, then runs for `turns` INFO reads;
    `running`: one is already running, so BGREWRITEAOF is refused as Redis 7.0 does."""

    def __init__(self, turns: int, running: bool = False) -> None:
        self.turns = turns
        self.running = running
        self.asked = 0
        self.reads = 0

    def bgrewriteaof(self) -> None:
        self.asked += 1
        if self.running:
            import redis

            raise redis.exceptions.ResponseError(
                "Background append only file rewriting already in progress"
            )

    def info(self, section: str) -> dict[str, Any]:
        assert section == "persistence"
        self.reads += 1
        busy = self.reads <= self.turns
        return {
            "aof_rewrite_scheduled": int(busy and self.reads == 1 and not self.running),
            "aof_rewrite_in_progress": int(busy and (self.reads > 1 or self.running)),
            "aof_last_bgrewrite_status": "ok",
        }


def test_rewrite_aof_waits_for_a_scheduled_then_running_rewrite() -> None:
    from bench import bench_stress

    redis = _RewritingRedis(turns=3)
    got = bench_stress.rewrite_aof(SimpleNamespace(redis_client=lambda: redis), poll_s=0.0)  # type: ignore[arg-type]
    assert (redis.asked, redis.reads) == (1, 4)  # scheduled, running, running, done
    assert got["status"] == "ok"


def test_rewrite_aof_waits_for_one_already_running_and_gives_up_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import bench_stress

    running = _RewritingRedis(turns=2, running=True)
    got = bench_stress.rewrite_aof(SimpleNamespace(redis_client=lambda: running), poll_s=0.0)  # type: ignore[arg-type]
    assert (running.asked, running.reads, got["status"]) == (1, 3, "ok")  # refused, then waited

    clock = iter(range(1000))  # one second per reading: 5 polls fit in a 5 s timeout
    monkeypatch.setattr(bench_stress.time, "monotonic", lambda: float(next(clock)))
    endless = _RewritingRedis(turns=10**9)
    never_done: Any = SimpleNamespace(redis_client=lambda: endless)
    got = bench_stress.rewrite_aof(never_done, timeout_s=5.0, poll_s=0.0)
    assert got["status"] == "timeout"  # the step starts anyway: no exception
    assert 1 <= endless.reads <= 5


def test_redis_background_reads_info_and_counts_what_happened_in_the_window() -> None:
    from bench.bench_profiles import redis_background, redis_background_delta

    def read(**info: Any) -> dict[str, int]:
        pipeline: Any = SimpleNamespace(redis_client=lambda: SimpleNamespace(info=lambda: info))
        return redis_background(pipeline)

    before = read(
        aof_rewrites=1,
        total_forks=2,
        latest_fork_usec=900,
        aof_current_size=70 << 20,
        used_memory=80 << 20,
        used_cpu_user_children=1.0,
        used_cpu_sys_children=0.5,
    )
    assert before["children_cpu_ms"] == 1500  # children's user + sys seconds, in ms
    after = read(
        aof_rewrites=2,
        total_forks=3,
        aof_rewrite_in_progress=1,
        latest_fork_usec=34_400,
        aof_current_size=150 << 20,
        used_memory=180 << 20,
        used_cpu_user_children=5.5,
        used_cpu_sys_children=0.388,
    )
    assert redis_background_delta(before, after) == {
        "aof_rewrites": 1,
        "forks": 1,
        "children_cpu_ms": 4388,
        "rewriting_start_end": [0, 1],
        "latest_fork_ms": 34.4,
        "aof_mib_end": 150,
        "used_mib_end": 180,
    }
    quiet = redis_background_delta(after, {**after, "latest_fork_usec": 58_300})
    assert quiet["forks"] == 0
    assert quiet["latest_fork_ms"] is None  # an older fork's pause, not this window's
    bare = read()  # an older Redis without these fields: zeros
    assert bare["aof_rewrites"] == 0
    assert bare["children_cpu_ms"] == 0

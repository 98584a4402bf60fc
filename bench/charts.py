"""PNG charts for REPORT.md, only when matplotlib (the `bench` extra) is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.render import common_dims, dims_text, peer_comparisons
from bench.results import PEER_BENCH, BenchResults, is_number, is_throughput, summarize


def write_charts(benches: list[BenchResults], results_dir: Path) -> list[Path]:
    """Throughput and latency bars per bench (median, min–max whiskers); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    for bench in benches:
        rows = summarize(bench.measurements)
        common = common_dims(rows)
        for kind, select in (
            ("throughput", is_throughput),
            ("latency", lambda r: r.unit == "ms"),
        ):
            chosen = sorted((r for r in rows if select(r)), key=lambda r: (r.case, r.dims))
            if not chosen:
                continue
            labels = [
                " ".join(x for x in (r.case, r.metric, dims_text(r, set(common))) if x != "-")
                for r in chosen
            ]
            medians = [r.median for r in chosen]
            lower = [r.median - r.min for r in chosen]
            upper = [r.max - r.median for r in chosen]
            fig, ax = plt.subplots(figsize=(9, 0.45 * len(chosen) + 1.5))
            ax.barh(range(len(chosen)), medians, xerr=[lower, upper], capsize=3)
            ax.set_yticks(range(len(chosen)), labels, fontsize=7)
            units = sorted({r.unit for r in chosen})
            ax.set_xlabel(f"median ({', '.join(units)}), whiskers min–max")
            ax.set_title(f"{bench.name}: {kind}")
            fig.tight_layout()
            path = results_dir / f"{bench.name}_{kind}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
        curve = stress_curve(bench.sections.get("stress_step", []))
        if curve:
            fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
            xs = [c[0] for c in curve]
            top.plot(xs, [c[1] for c in curve], marker="o", label="offered")
            top.plot(xs, [c[2] for c in curve], marker="o", label="processed")
            top.set_ylabel("msg/s")
            top.legend()
            bottom.plot(xs, [c[3] for c in curve], marker="o", label="p50")
            bottom.plot(xs, [c[4] for c in curve], marker="o", label="p99")
            bottom.axhline(1000, linestyle="--", linewidth=1, label="1 s limit")
            bottom.set_ylabel("ms (creation → handler)")
            bottom.set_xlabel("target msg/s")
            bottom.legend()
            for ax in (top, bottom):
                ax.set_xscale("log")
            fig.suptitle(f"{bench.name}: stress curve")
            fig.tight_layout()
            path = results_dir / f"{bench.name}_curve.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write_peer_chart(benches: list[BenchResults], results_dir: Path) -> list[Path]:
    """Ours vs the peer per case (median bars, min–max whiskers); [] without data/matplotlib."""
    all_rows = {b.name: summarize(b.measurements) for b in benches}
    peer = next((b for b in benches if b.name == PEER_BENCH), None)
    comparisons = peer_comparisons(all_rows, peer.sections.get("peer_context", []) if peer else [])
    if not comparisons:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    labels = [f"{c.handler}, concurrency {c.concurrency}" for c in comparisons]
    fig, ax = plt.subplots(figsize=(8, 0.8 * len(comparisons) + 1.5))
    height = 0.38
    for offset, name, rows in (
        (-height / 2, "Parallel Consumer", [c.peer for c in comparisons]),
        (height / 2, "ours (hosted)", [c.ours for c in comparisons]),
    ):
        ys = [i + offset for i, r in enumerate(rows) if r is not None]
        present = [r for r in rows if r is not None]
        if not present:
            continue
        ax.barh(
            ys,
            [r.median for r in present],
            height=height,
            xerr=[[r.median - r.min for r in present], [r.max - r.median for r in present]],
            capsize=3,
            label=name,
        )
    ax.set_yticks(range(len(comparisons)), labels, fontsize=8)
    ax.set_xlabel("msg/s, median of runs (whiskers min–max)")
    ax.set_title("consume drain: ours vs Confluent Parallel Consumer (KEY order)")
    ax.legend()
    fig.tight_layout()
    path = results_dir / "peer_vs_ours_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def stress_curve(steps: list[dict[str, Any]]) -> list[tuple[float, float, float, float, float]]:
    """(target, offered, processed, p50, p99) per stress step, for the curve chart."""
    out = []
    for rec in steps:
        r = rec.get("result") or {}
        if r.get("retried"):
            continue  # the step's second measurement is the one that counts
        keys = ("target_msg_s", "offered_msg_s", "processed_msg_s", "p50_ms", "p99_ms")
        if all(is_number(r.get(k)) for k in keys):
            out.append(tuple(float(r[k]) for k in keys))
    return sorted(out)  # type: ignore[arg-type]

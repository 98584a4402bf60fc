"""py-spy profiles: record a process, and the top functions of a speedscope profile."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any


def speedscope_top(data: dict[str, Any], n: int = 15) -> list[dict[str, Any]]:
    """Top functions by self time (% of all samples) from a py-spy speedscope profile.

    py-spy names a frame per line; lines of one function (name + file) are summed."""
    frames = data.get("shared", {}).get("frames", [])
    self_weight: dict[tuple[str, str], float] = {}
    total = 0.0
    for profile in data.get("profiles", []):
        samples = profile.get("samples", [])
        weights = profile.get("weights") or [1.0] * len(samples)
        for stack, weight in zip(samples, weights, strict=False):
            total += weight
            if not stack:
                continue
            idx = stack[-1]
            frame = frames[idx] if 0 <= idx < len(frames) else {}
            key = (str(frame.get("name", "?")), str(frame.get("file", "?")))
            self_weight[key] = self_weight.get(key, 0.0) + weight
    if total <= 0:
        return []
    top = sorted(self_weight.items(), key=lambda kv: -kv[1])[:n]
    return [
        {"function": name, "file": file, "self_pct": round(100.0 * weight / total, 2)}
        for (name, file), weight in top
    ]


def py_spy_record(
    pid: int, out_path: Path, duration_s: int, rate_hz: int = 50, timeout_s: float | None = None
) -> dict[str, Any]:
    """`py-spy record --format speedscope` of one process → its top functions.

    Never raises: a failed profile is reported in the result ({"error": ...})."""
    exe = shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy not installed"}
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration_s),
        "--rate",
        str(rate_hz),
        "--format",
        "speedscope",
        "--output",
        str(out_path),
        "--nonblocking",
    ]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s or duration_s + 60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"py-spy failed: {exc!r}"}
    if proc.returncode != 0 or not out_path.exists():
        return {"error": f"py-spy exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    try:
        data = json.loads(out_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"unreadable profile: {exc!r}"}
    return {"path": str(out_path), "top": speedscope_top(data)}

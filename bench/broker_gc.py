"""The broker JVM's collector pauses in a time window, from its `-Xlog:gc` file.

Why: a steady-latency window that stalls on every host at once may be the broker pausing
(a young collection stops produce and fetch alike). The local broker logs each pause
with an epoch-ms decoration (qywx_ray/devstack/kafka.py `GC_LOG`), e.g.

    [1796651863590ms] GC(12) Pause Young (Normal) (G1 Evacuation Pause) 60M->9M(256M) 4.321ms

so a window's pauses can be listed beside its own latency samples. Evidence, not a
result: an unreadable or missing log gives an empty summary."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from qywx_ray.devstack.kafka import GC_LOG

# "[<epoch ms>ms] GC(<n>) Pause <kind> (<phase>) (<cause>) <heap before>-><after>(<size>) <ms>ms"
_PAUSE = re.compile(r"^\[(\d+)ms\] GC\(\d+\) (Pause .*?) (\S+->\S+) (\d+(?:\.\d+)?)ms$")


class Pause(NamedTuple):
    at_ms: int  # logged at, epoch ms
    kind: str  # kind and cause, e.g. "Pause Young (Normal) (G1 Evacuation Pause)"
    ms: float  # the pause
    heap: str  # before->after(size), e.g. "60M->9M(256M)": after a young pause, what is live


def parse_pauses(lines: Iterable[str]) -> list[Pause]:
    """Every pause line's Pause (other lines, e.g. concurrent phases, are skipped)."""
    out: list[Pause] = []
    for line in lines:
        m = _PAUSE.match(line.strip())
        if m:
            out.append(Pause(int(m.group(1)), m.group(2), float(m.group(4)), m.group(3)))
    return out


def window_pauses(
    pauses: list[Pause], since_s: float, until_s: float, long_ms: float = 5.0
) -> dict[str, Any]:
    """Pauses logged in [since_s, until_s] (Unix seconds): count, total and max ms, and
    the long ones (>= long_ms) as [seconds into the window, kind, ms]."""
    inside = [p for p in pauses if since_s * 1000 <= p[0] <= until_s * 1000]
    return {
        "count": len(inside),
        "total_ms": round(sum(p[2] for p in inside), 1),
        "max_ms": round(max((p[2] for p in inside), default=0.0), 1),
        "long": [
            [round(p[0] / 1000 - since_s, 2), p[1], round(p[2], 1)]
            for p in inside
            if p[2] >= long_ms
        ],
    }


def broker_pauses(logs_dirs: Iterable[Path], since_s: float, until_s: float) -> dict[str, Any]:
    """`window_pauses` over every broker's gc log (rotated files included)."""
    pauses: list[Pause] = []
    for logs in logs_dirs:
        for path in sorted(logs.glob(f"{GC_LOG}*")):
            try:
                pauses += parse_pauses(path.read_text(errors="replace").splitlines())
            except OSError:
                continue
    return window_pauses(pauses, since_s, until_s)

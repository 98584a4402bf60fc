"""Nearest-rank percentiles: the one definition the hosts' latency stats and the benches
quote, so a p99 means the same thing in `qywx-ray` output and in bench/results."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentiles(
    samples: Iterable[float], qs: Sequence[float] = (50, 99, 100)
) -> dict[float, float]:
    """Nearest-rank percentiles: q=0 is the minimum, q=100 the maximum, p50 a real sample.

    Raises ValueError on an empty sample set: a percentile of nothing is a bug upstream.
    """
    ordered = sorted(float(s) for s in samples)
    if not ordered:
        raise ValueError("percentiles of an empty sample set")
    n = len(ordered)
    out: dict[float, float] = {}
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        rank = max(1, math.ceil(q / 100.0 * n))
        out[q] = ordered[rank - 1]
    return out

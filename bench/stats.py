"""Percentiles and medians: what every bench quotes (medians of repeated runs).

The percentile is the product's own (qywx_ray.obs.stats), re-exported here."""

from __future__ import annotations

from collections.abc import Iterable

from qywx_ray.obs.stats import percentiles

__all__ = ["median", "percentiles"]


def median(values: Iterable[float]) -> float:
    """The middle value (mean of the two middle ones for an even count)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("median of an empty sequence")
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2

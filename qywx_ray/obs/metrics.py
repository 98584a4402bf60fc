"""Metrics that work the same in a driver, a Serve replica or any Ray actor on any node.

Inside a Ray worker the values go to Ray's metrics agent (`ray.util.metrics`), which
every node exports and Prometheus discovers through Ray's service-discovery file: one
scrape configuration covers actors wherever they move (Ray prefixes names with `ray_`).
Outside Ray (simulator, CLI, tests) they go to prometheus_client's default registry.
Every process also keeps a local mirror, so a test or an admin route can read values
without scraping.

Names follow Prometheus conventions: `qywx_` prefix, `_total` for counters, base units.

Histograms inside Ray are not `ray.util.metrics.Histogram`s: Ray 2.60's metrics agent
rebuilds those by calling OpenTelemetry's `record()` once per observation it was sent, so
each timed message cost the agent ~25 us of CPU in one burst per export cycle. At 2,000
msg/s that was ~0.25 s of agent CPU every 5 s, which on a 2-core node stalled the whole
pipeline and set its p99 (bench_consume's steady phase, docs/benchmarks.md). We keep the
buckets here and publish them as gauges (`<name>_bucket{le}`, `_sum`, `_count`,
cumulative, like a Prometheus histogram): the agent's cost is one value per bucket
whatever the rate, and every query stays the same.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from prometheus_client.utils import floatToGoString

_lock = threading.Lock()
_metrics: dict[str, Metric] = {}

DEFAULT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAM_PUBLISH_INTERVAL_S = 1.0  # Ray's agent exports every ~5-10 s anyway

log = logging.getLogger(__name__)
Key = tuple[str, ...]  # label values, in the metric's label order
Buckets = list[tuple[str, int]]  # [(le, cumulative count)]
_publish_lock = threading.Lock()  # one publisher at a time: a stale value never lands last
_publisher: threading.Thread | None = None


class BucketCounts:
    """A histogram's bucket counts per label set, read out cumulatively (Prometheus `le`).
    The sum lives in the Metric's mirror; the count is the `+Inf` bucket."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.les = (*(floatToGoString(b) for b in self.bounds), "+Inf")
        self._counts: dict[Key, list[int]] = {}
        self._dirty: set[Key] = set()

    def observe(self, key: Key, value: float) -> None:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * (len(self.bounds) + 1)
        counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self._dirty.add(key)

    def take_changed(self) -> list[tuple[Key, Buckets]]:
        """(key, [(le, cumulative count)]) for each label set changed since the last call."""
        out: list[tuple[Key, Buckets]] = []
        for key in sorted(self._dirty):
            running, buckets = 0, []
            for le, n in zip(self.les, self._counts[key], strict=True):
                running += n
                buckets.append((le, running))
            out.append((key, buckets))
        self._dirty.clear()
        return out


class _GaugeHistogram:
    """BucketCounts published through three ray.util.metrics gauges."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], bounds: Sequence[float]):
        from ray.util import metrics as rm

        self.labels = labels
        self.state = BucketCounts(bounds)
        self.bucket = rm.Gauge(f"{name}_bucket", doc, tag_keys=(*labels, "le"))
        self.sum = rm.Gauge(f"{name}_sum", doc, tag_keys=labels)
        self.count = rm.Gauge(f"{name}_count", doc, tag_keys=labels)

    def publish(self, changed: list[tuple[Key, Buckets, float]]) -> None:
        """Each changed label set: its cumulative buckets and its sum (the Metric's mirror)."""
        for key, buckets, total in changed:
            tags = dict(zip(self.labels, key, strict=True))
            for le, n in buckets:
                self.bucket.set(n, tags={**tags, "le": le})
            self.sum.set(total, tags=tags)
            self.count.set(buckets[-1][1], tags=tags)


def publish_histograms() -> None:
    """Push every changed histogram to Ray's gauges now (the publisher does it each second)."""
    with _publish_lock:
        with _lock:
            todo = [
                (m._backend, [(k, b, m._mirror[k]) for k, b in m._backend.state.take_changed()])
                for m in _metrics.values()
                if isinstance(m._backend, _GaugeHistogram)
            ]
        for hist, changed in todo:
            if changed:
                hist.publish(changed)


def _publish_forever() -> None:
    while True:
        time.sleep(HISTOGRAM_PUBLISH_INTERVAL_S)
        try:
            publish_histograms()
        except Exception:  # a metrics hiccup must never end the publisher
            log.warning("histogram publish failed", exc_info=True)


def _ensure_publisher() -> None:
    global _publisher
    if _publisher is None or not _publisher.is_alive():
        _publisher = threading.Thread(
            target=_publish_forever, name="qywx-histogram-publisher", daemon=True
        )
        _publisher.start()


def _in_ray_worker() -> bool:
    """True in an actor or Serve replica (Ray's WORKER_MODE = 1; the driver is 0)."""
    try:
        import ray

        return bool(ray.is_initialized()) and ray.get_runtime_context().worker.mode == 1
    except Exception:  # noqa: BLE001 - a probe: anything but a live Ray worker means no
        return False


class Metric:
    """One named metric; `kind` is counter, gauge or histogram."""

    def __init__(
        self,
        kind: str,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS_S,
    ) -> None:
        self.kind = kind
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.buckets = tuple(buckets)
        self._backend: Any = None
        self._ray = False
        self._mirror: dict[tuple[str, ...], float] = defaultdict(float)
        self._counts: dict[tuple[str, ...], int] = defaultdict(int)

    def _resolve(self) -> None:
        if self._backend is not None:
            return
        if _in_ray_worker():
            from ray.util import metrics as rm

            if self.kind == "counter":
                self._backend = rm.Counter(self.name, self.doc, tag_keys=self.labels)
            elif self.kind == "gauge":
                self._backend = rm.Gauge(self.name, self.doc, tag_keys=self.labels)
            else:
                self._backend = _GaugeHistogram(self.name, self.doc, self.labels, self.buckets)
                _ensure_publisher()
            self._ray = True
            return
        import prometheus_client as pc

        base = (
            self.name[: -len("_total")]
            if self.kind == "counter" and self.name.endswith("_total")
            else self.name
        )
        try:
            if self.kind == "counter":
                self._backend = pc.Counter(base, self.doc, self.labels)
            elif self.kind == "gauge":
                self._backend = pc.Gauge(self.name, self.doc, self.labels)
            else:
                self._backend = pc.Histogram(self.name, self.doc, self.labels, buckets=self.buckets)
        except ValueError:  # already registered in this process (re-import in tests)
            self._backend = pc.REGISTRY._names_to_collectors.get(
                base
            ) or pc.REGISTRY._names_to_collectors.get(self.name)

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(str(labels.get(k, "")) for k in self.labels)

    def _target(self, labels: dict[str, str]) -> Any:
        if self._ray or not self.labels:
            return self._backend
        return self._backend.labels(**{k: str(labels.get(k, "")) for k in self.labels})

    def inc(self, value: float = 1.0, **labels: str) -> None:
        if value <= 0:  # Ray's counters reject 0 (and a counter never goes down)
            return
        with _lock:
            self._resolve()
            self._mirror[self._key(labels)] += value
        if self._ray:
            self._backend.inc(value, tags={k: str(v) for k, v in labels.items()} or None)
        else:
            self._target(labels).inc(value)

    def set(self, value: float, **labels: str) -> None:
        with _lock:
            self._resolve()
            self._mirror[self._key(labels)] = value
        if self._ray:
            self._backend.set(value, tags={k: str(v) for k, v in labels.items()} or None)
        else:
            self._target(labels).set(value)

    def observe(self, value: float, **labels: str) -> None:
        with _lock:
            self._resolve()
            key = self._key(labels)
            self._mirror[key] += value
            self._counts[key] += 1
            if self._ray:  # published by the publisher thread, see the module docstring
                self._backend.state.observe(key, value)
                return
        self._target(labels).observe(value)

    def value(self, **labels: str) -> float:
        """The local mirror: counter total, gauge value, or histogram sum."""
        return self._mirror.get(self._key(labels), 0.0)

    def total(self) -> float:
        return sum(self._mirror.values())


def _get(kind: str, name: str, doc: str, labels: Sequence[str], **kw: Any) -> Metric:
    with _lock:
        metric = _metrics.get(name)
        if metric is None:
            metric = Metric(kind, name, doc, labels, **kw)
            _metrics[name] = metric
        return metric


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Metric:
    return _get("counter", name, doc, labels)


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Metric:
    return _get("gauge", name, doc, labels)


def histogram(
    name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = DEFAULT_BUCKETS_S
) -> Metric:
    return _get("histogram", name, doc, labels, buckets=buckets)


def snapshot() -> dict[str, float]:
    """Totals of every metric this process has touched (for tests and admin/introspection)."""
    with _lock:
        return {name: m.total() for name, m in _metrics.items()}


def render_text() -> str:
    """This process's metrics in Prometheus text format, from the local mirror.

    Serve replicas are Ray workers, whose metrics go to Ray's per-node exporter; this
    gives the ingress's own `/metrics` route something to show as well.
    """
    lines: list[str] = []
    with _lock:
        items = sorted(_metrics.items())
        for name, m in items:
            kind = "untyped" if m.kind == "histogram" else m.kind
            out_name = f"{name}_sum" if m.kind == "histogram" else name
            lines.append(f"# HELP {out_name} {m.doc}")
            lines.append(f"# TYPE {out_name} {kind}")
            for key, value in sorted(m._mirror.items()):
                labels = ",".join(
                    f'{k}="{v}"' for k, v in zip(m.labels, key, strict=True) if v != ""
                )
                lines.append(f"{out_name}{{{labels}}} {value}" if labels else f"{out_name} {value}")
            if m.kind == "histogram":
                for key, count in sorted(m._counts.items()):
                    labels = ",".join(
                        f'{k}="{v}"' for k, v in zip(m.labels, key, strict=True) if v != ""
                    )
                    lines.append(
                        f"{name}_count{{{labels}}} {count}" if labels else f"{name}_count {count}"
                    )
    return "\n".join(lines) + "\n"

"""How Ray 2.60 exports our metrics: the names alerts.yml and the dashboard rely on.

A counter, a gauge and a histogram recorded with ray.util.metrics inside a Ray actor are
scraped from the node's metrics agent as `ray_<name>` (a counter already ending in
`_total` keeps exactly one `_total`; a histogram gives `_bucket`/`_sum`/`_count`), with
our labels plus Ray's own (WorkerId, NodeAddress, ...). deploy/metrics.yml documents this.
The other tests check that qywx_ray.obs.metrics takes that path inside an actor, and that
its histograms (kept in the process and published as cumulative gauges, see
qywx_ray/obs/metrics.py) scrape as the same `_bucket{le}`/`_sum`/`_count` series.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray

pytestmark = pytest.mark.integration

EXPORT_WAIT_S = 60.0  # Ray's agent exports on a ~5-10 s cycle


@ray.remote(num_cpus=0)
class _Emitter:
    def emit_raw(self) -> None:
        from ray.util import metrics as rm

        c = rm.Counter("qywx_export_probe_total", "probe counter", tag_keys=("result",))
        c.inc(3, tags={"result": "ok"})
        rm.Gauge("qywx_export_probe_depth", "probe gauge").set(7)
        h = rm.Histogram("qywx_export_probe_seconds", "probe histogram", boundaries=[0.1, 1.0])
        h.observe(0.5)
        h.observe(0.05)

    def emit_facade(self) -> bool:
        from qywx_ray.obs import metrics

        metrics.counter("qywx_export_facade_total", "facade probe", ["result"]).inc(2, result="ok")
        return metrics._in_ray_worker()

    def emit_facade_histogram(self, values: list[float]) -> None:
        from qywx_ray.obs import metrics

        h = metrics.histogram("qywx_export_facade_seconds", "facade histogram", ["api"])
        for v in values:
            h.observe(v, api="sync")


@pytest.fixture
def emitter(ray_session: None) -> Iterator[Any]:
    actor = _Emitter.remote()  # type: ignore[attr-defined]
    yield actor
    ray.kill(actor)


def _metrics_port() -> int:
    return int(ray.nodes()[0]["MetricsExportPort"])


def _scrape_until(port: int, *needles: str, ready: Callable[[str], bool] | None = None) -> str:
    """Scrape Ray's exporter until every needle is in the text (and `ready` holds), or
    EXPORT_WAIT_S passed; the last scrape either way, for the asserts to judge."""
    deadline = time.monotonic() + EXPORT_WAIT_S
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        if all(n in text for n in needles) and (ready is None or ready(text)):
            return text
        time.sleep(0.5)
    return text


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_ray_exports_actor_metrics_with_ray_prefix(emitter: Any) -> None:
    ray.get(emitter.emit_raw.remote(), timeout=60)
    text = _scrape_until(
        _metrics_port(), "ray_qywx_export_probe_seconds_count", "ray_qywx_export_probe_total{"
    )
    names = set(re.findall(r"^(\w+)\{", text, re.MULTILINE))
    assert {n for n in names if "export_probe" in n} == {
        "ray_qywx_export_probe_total",
        "ray_qywx_export_probe_depth",
        "ray_qywx_export_probe_seconds_bucket",
        "ray_qywx_export_probe_seconds_sum",
        "ray_qywx_export_probe_seconds_count",
    }
    assert _sample(text, "ray_qywx_export_probe_total", result="ok") == 3.0
    assert _sample(text, "ray_qywx_export_probe_depth") == 7.0
    assert _sample(text, "ray_qywx_export_probe_seconds_count") == 2.0
    assert _sample(text, "ray_qywx_export_probe_seconds_bucket", le="0.1") == 1.0
    assert _sample(text, "ray_qywx_export_probe_seconds_bucket", le="+Inf") == 2.0
    assert "# TYPE ray_qywx_export_probe_total counter" in text
    assert "# TYPE ray_qywx_export_probe_seconds histogram" in text
    # Ray's own labels come with every series: queries aggregate over WorkerId.
    line = next(ln for ln in text.splitlines() if ln.startswith("ray_qywx_export_probe_total{"))
    assert "WorkerId=" in line
    assert "NodeAddress=" in line


def test_facade_inside_actor_goes_to_ray_export(emitter: Any) -> None:
    used_ray = ray.get(emitter.emit_facade.remote(), timeout=60)
    assert used_ray is True
    text = _scrape_until(_metrics_port(), "ray_qywx_export_facade_total{")
    assert _sample(text, "ray_qywx_export_facade_total", result="ok") == 2.0


def _counted(name: str, count: int, **labels: str) -> Callable[[str], bool]:
    """True once one export cycle shows `count` in the histogram's count and +Inf bucket."""
    return lambda text: (
        _sample(text, f"{name}_count", **labels) == count
        and _sample(text, f"{name}_bucket", le="+Inf", **labels) == count
        and _sample(text, f"{name}_bucket", le="0.001", **labels) is not None
    )


def test_facade_histogram_scrapes_as_cumulative_buckets(emitter: Any) -> None:
    # 20,000 observations: published as a handful of gauge values, not 20,000 records.
    values = [0.003] * 19_997 + [0.2, 0.2, 20.0]
    ray.get(emitter.emit_facade_histogram.remote(values), timeout=60)
    port, name = _metrics_port(), "ray_qywx_export_facade_seconds"
    text = _scrape_until(port, ready=_counted(name, 20_000, api="sync"))
    expected = {"0.0025": 0, "0.005": 19_997, "0.1": 19_997, "0.25": 19_999, "10.0": 19_999}
    for le, count in {**expected, "+Inf": 20_000}.items():
        got = _sample(text, f"{name}_bucket", api="sync", le=le)
        assert got == count, (le, got)
    assert _sample(text, f"{name}_count", api="sync") == 20_000
    total = _sample(text, f"{name}_sum", api="sync")
    assert total is not None
    assert abs(total - (0.003 * 19_997 + 20.4)) < 1e-6
    # Later observations move the same series (cumulative, published again).
    ray.get(emitter.emit_facade_histogram.remote([0.001]), timeout=60)
    text = _scrape_until(port, ready=_counted(name, 20_001, api="sync"))
    assert _sample(text, f"{name}_bucket", api="sync", le="0.001") == 1
    assert _sample(text, f"{name}_bucket", api="sync", le="+Inf") == 20_001

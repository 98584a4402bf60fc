"""The monitoring files agree with the metric catalogue and with Prometheus itself.

deploy/metrics.yml is the one list of metric names; alerts and dashboard panels may only
use those names as Ray exports them (`ray_` prefix, histogram `_bucket/_sum/_count`, see
tests/integration/test_metrics_export.py). promtool validates and unit-tests the rules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROM = DEPLOY / "prometheus"
SEVERITIES = {"warning", "page", "critical", "p1", "emergency"}
METRIC_RE = re.compile(r"\b(ray_qywx_[a-z0-9_]+|qywx_[a-z0-9_]+)\b")
BY_RE = re.compile(r"\bby\s*\(([^)]*)\)")
HIST_SUFFIXES = ("_bucket", "_sum", "_count")
# 1-minute evaluation for most alerts; 1-day windows in a file evaluated every 5 minutes
TEST_FILES = ("alerts_test.yml", "alerts_test_daily.yml")


def _catalogue() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "metrics.yml").read_text())
    return {m["name"]: m for m in doc["metrics"]}


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "qywx-ray.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _resolve(scraped: str, catalogue: dict[str, dict[str, Any]]) -> str | None:
    """Catalogue name behind a scraped series name, or None when it is not catalogued."""
    if not scraped.startswith("ray_qywx_"):
        return None
    name = scraped[len("ray_") :]
    if name in catalogue:
        return None if catalogue[name]["type"] == "histogram" else name
    for suffix in HIST_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and catalogue.get(base, {}).get("type") == "histogram":
            return base
    return None


def _check_expr(expr: str, catalogue: dict[str, dict[str, Any]], recorded: set[str]) -> list[str]:
    problems = []
    used = []
    for token in METRIC_RE.findall(expr):
        if token in recorded:
            continue
        base = _resolve(token, catalogue)
        if base is None:
            problems.append(f"{token!r} in {expr!r} is not a catalogued metric as scraped")
        else:
            used.append(base)
    labels = {lbl for m in used for lbl in catalogue[m]["labels"]} | {"le"}
    for group in BY_RE.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if used and label not in labels:
                problems.append(f"label {label!r} in {expr!r} is not a label of {used}")
    return problems


def test_catalogue_is_well_formed() -> None:
    doc = yaml.safe_load((DEPLOY / "metrics.yml").read_text())
    names = [m["name"] for m in doc["metrics"]]
    assert len(names) == len(set(names)), "duplicate metric names"
    assert doc["scrape_prefix"] == "ray_"
    for m in doc["metrics"]:
        assert m["name"].startswith("qywx_"), m
        assert m["type"] in {"counter", "gauge", "histogram"}, m
        assert (m["type"] == "counter") == m["name"].endswith("_total"), m
        assert isinstance(m["labels"], list), m
        assert m["meaning"], m
        assert m["emitted_by"], m
    # the names the docs and the alert rules rely on
    for required in (
        "qywx_consumer_lag",
        "qywx_rebalances_total",
        "qywx_degraded_messages_total",
        "qywx_kafka_failures_total",
        "qywx_dlq_emergency_writes_total",
        "qywx_users_blocked_total",
    ):
        assert required in names


def test_alerts_reference_only_catalogued_metrics() -> None:
    catalogue = _catalogue()
    rules = _alert_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    problems = [p for r in rules for p in _check_expr(r["expr"], catalogue, recorded)]
    assert problems == []


def test_check_expr_rejects_unknown_names_and_labels() -> None:
    catalogue = _catalogue()
    assert _check_expr("sum(rate(ray_qywx_produced_total[1m]))", catalogue, set()) == []
    assert _check_expr("sum(rate(qywx_produced_total[1m]))", catalogue, set())  # no prefix
    assert _check_expr("ray_qywx_processing_seconds", catalogue, set())  # histogram w/o suffix
    assert _check_expr("sum(rate(ray_qywx_nonexistent_total[1m]))", catalogue, set())
    assert _check_expr("sum by (reason) (rate(ray_qywx_produced_total[1m]))", catalogue, set())


def test_every_alert_has_severity_summary_and_tests() -> None:
    alerts = [r for r in _alert_rules() if "alert" in r]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for a in alerts:
        assert a["labels"]["severity"] in SEVERITIES, a["alert"]
        assert a["annotations"]["summary"], a["alert"]
    tests = [t for f in TEST_FILES for t in yaml.safe_load((PROM / f).read_text())["tests"]]
    checks = [c for t in tests for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in checks if c["exp_alerts"]}
    quiet = {c["alertname"] for c in checks if not c["exp_alerts"]}
    assert fired == set(names), "each alert needs a test where it fires"
    assert quiet == set(names), "each alert needs a test where it stays quiet"


def test_seed_alerts_and_severities_present() -> None:
    severity = {r["alert"]: r["labels"]["severity"] for r in _alert_rules() if "alert" in r}
    assert severity["QywxRebalanceFrequent"] == "page"
    assert severity["QywxKafkaProducerDegraded"] == "page"
    assert severity["QywxKafkaProducerDown"] == "critical"
    assert severity["QywxDLQEmergencyWrite"] == "critical"
    assert severity["QywxDLQConsumerStalled"] == "critical"
    assert severity["QywxDLQUnrecoverableHigh"] == "p1"
    assert severity["QywxUserBlocked"] == "critical"
    assert severity["QywxMassBlocking"] == "emergency"


def test_dashboard_references_only_catalogued_metrics_and_shows_all() -> None:
    catalogue = _catalogue()
    exprs = _dashboard_exprs()
    problems = [p for e in exprs for p in _check_expr(e, catalogue, set())]
    assert problems == []
    shown = {_resolve(tok, catalogue) for e in exprs for tok in METRIC_RE.findall(e)}
    assert set(catalogue) - shown == set(), "catalogued metrics without a panel"


def test_dashboard_structure_and_provisioning() -> None:
    dash = json.loads((DEPLOY / "grafana" / "qywx-ray.json").read_text())
    assert dash["uid"] == "qywx-ray"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    for area in ("Ingest", "Kafka", "Latency", "Users", "Protection", "Dead-letter"):
        assert any(area in r for r in rows), area
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        pos = p["gridPos"]
        assert pos["x"] >= 0, p["title"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    db = yaml.safe_load((prov / "dashboards" / "qywx-ray.yml").read_text())
    assert db["providers"][0]["options"]["path"]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_check_rules() -> None:
    res = _promtool("check", "rules", "alerts.yml", cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass() -> None:
    res = _promtool("test", "rules", *TEST_FILES, cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_catch_a_broken_threshold(tmp_path: Path) -> None:
    """The rule tests are not vacuous: raising a threshold makes them fail."""
    text = (PROM / "alerts.yml").read_text()
    broken = text.replace(
        "qywx:users_blocked:increase5m >= 10", "qywx:users_blocked:increase5m >= 50"
    )
    assert broken != text
    (tmp_path / "alerts.yml").write_text(broken)
    doc = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    doc["tests"] = [  # only the mass-blocking cases: the long 1-day cases take seconds
        t
        for t in doc["tests"]
        if any(c["alertname"] == "QywxMassBlocking" for c in t["alert_rule_test"])
    ]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(doc))
    res = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert res.returncode != 0
    assert "QywxMassBlocking" in res.stdout + res.stderr


def test_promtool_check_config(tmp_path: Path) -> None:
    config = (PROM / "prometheus.yml").read_text()
    assert "/tmp/ray/prom_metrics_service_discovery.json" in config
    # promtool resolves rule_files relative to the config; point it at the repo's file.
    # It also opens the service-discovery file, which only a running Ray head writes: give
    # it one of the same shape in tmp_path, so the check does not depend on a Ray session.
    sd = tmp_path / "prom_metrics_service_discovery.json"
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": ["127.0.0.1:8080"]}]))
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(PROM / "alerts.yml")).replace(
            "/tmp/ray/prom_metrics_service_discovery.json", str(sd)
        )
    )
    res = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 rule files found" in res.stdout + res.stderr


RUNBOOK_RE = re.compile(r"^(docs/[a-z_]+\.md)#([a-z0-9-]+)(?::\s.+)?$")


def _anchors(doc: Path) -> set[str]:
    """The anchors MkDocs gives the headings of `doc` (its toc extension's slugify)."""
    from markdown.extensions.toc import slugify

    return {
        slugify(line.lstrip("#").strip(), "-")
        for line in doc.read_text().splitlines()
        if re.match(r"#{1,6} ", line)
    }


def _runbooks(path: Path) -> dict[str, str]:
    rules = yaml.safe_load(path.read_text())
    return {
        str(r["alert"]): str(r.get("annotations", {}).get("runbook", ""))
        for g in rules["groups"]
        for r in g["rules"]
        if "alert" in r
    }


def test_every_alert_runbook_names_a_section_that_exists() -> None:
    """An alert's `runbook` is `docs/<file>.md#<anchor>[: hint]`, and the anchor is a
    heading of that file: a page at 3 a.m. must not lead to a section that is not there
    (the alerts pointed at a 'Kafka down' runbook that did not exist)."""
    root = DEPLOY.parent
    runbooks = _runbooks(PROM / "alerts.yml")
    assert runbooks
    for alert, runbook in runbooks.items():
        m = RUNBOOK_RE.match(runbook)
        assert m, f"{alert}: runbook {runbook!r} is not docs/<file>.md#<anchor>"
        doc, anchor = root / m.group(1), m.group(2)
        assert doc.exists(), f"{alert}: {doc} does not exist"
        assert anchor in _anchors(doc), f"{alert}: no heading #{anchor} in {m.group(1)}"


def test_runbook_check_is_not_vacuous() -> None:
    anchors = _anchors(DEPLOY.parent / "docs" / "operations.md")
    assert "kafka-down" in anchors
    assert "node-failure" in anchors
    assert "kafka-is-down-somewhere" not in anchors

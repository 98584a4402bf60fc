"""docker-compose.yml and the Dockerfile: structure, and every referenced file exists.

No Docker engine or compose plugin runs here; `docker compose config` is attempted only
when one is available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict)
    return {k: str(v) for k, v in env.items()}


def test_services_present() -> None:
    services = set(_compose()["services"])
    assert {
        "kafka1",
        "kafka2",
        "kafka3",
        "redis-master",
        "redis-replica",
        "sentinel1",
        "sentinel2",
        "sentinel3",
        "ray-head",
        "ray-worker",
        "serve",
        "prometheus",
        "grafana",
    } <= services


def test_three_kraft_brokers_share_one_quorum() -> None:
    services = _compose()["services"]
    brokers = [s for name, s in services.items() if name.startswith("kafka")]
    assert len(brokers) == 3
    envs = [_env(b) for b in brokers]
    assert len({e["KAFKA_NODE_ID"] for e in envs}) == 3
    voters = {e["KAFKA_CONTROLLER_QUORUM_VOTERS"] for e in envs}
    assert len(voters) == 1
    voter_ids = {v.split("@")[0] for v in voters.pop().split(",")}
    assert voter_ids == {e["KAFKA_NODE_ID"] for e in envs}
    assert len({e["CLUSTER_ID"] for e in envs}) == 1
    for e, b in zip(envs, brokers, strict=True):
        assert b["image"].startswith("apache/kafka:")
        assert "controller" in e["KAFKA_PROCESS_ROLES"]
        assert "broker" in e["KAFKA_PROCESS_ROLES"]
        assert e["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert e["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert e["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
        assert e["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{b['hostname']}:9092"
    assert len({b["volumes"][0] for b in brokers}) == 3  # one data volume each


def test_redis_sentinel_topology_matches_production_profile() -> None:
    services = _compose()["services"]
    sentinels = [n for n, s in services.items() if "--sentinel" in str(s.get("command", ""))]
    assert len(sentinels) == 3
    redis_nodes = ["redis-master", "redis-replica", "redis-replica-2"]
    for name in redis_nodes[1:]:
        assert "--replicaof redis-master 6379" in services[name]["command"]
    for name in redis_nodes:  # any node can be promoted: all refuse unreplicated writes
        assert "--min-replicas-to-write 1" in services[name]["command"], name
    conf = (ROOT / "deploy" / "redis" / "sentinel.conf").read_text()
    assert "sentinel monitor mymaster redis-master 6379 2" in conf
    prod = yaml.safe_load((ROOT / "config" / "production.yaml").read_text())
    assert prod["redis"]["master_name"] == "mymaster"
    assert sorted(a.split(":")[0] for a in prod["redis"]["sentinel_addrs"]) == sorted(sentinels)
    assert sorted(prod["kafka"]["bootstrap_servers"].replace(":9092", "").split(",")) == [
        n for n in sorted(services) if n.startswith("kafka")
    ]


def test_app_services_run_production_profile_against_compose_names() -> None:
    services = _compose()["services"]
    for name in ("ray-head", "ray-worker", "serve"):
        svc = services[name]
        assert svc["build"] == "."
        env = _env(svc)
        assert env["QYWX_PROFILE"] == "production"
        assert env["QYWX_KAFKA__BOOTSTRAP_SERVERS"] == "kafka1:9092,kafka2:9092,kafka3:9092"
        assert env["QYWX_REDIS__MODE"] == "sentinel"
        for secret in ("QYWX_WECOM__ENCODING_AES_KEY", "QYWX_ADMIN__TOKEN", "RAY_AUTH_TOKEN"):
            assert env[secret].startswith("${" + secret + ":?"), "secrets must come from .env"
    assert "ray start --head" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert "serve deploy serve/config.yaml" in services["serve"]["command"]
    assert "qywx-ray topics ensure" in services["serve"]["command"]


def test_compose_env_names_are_real_settings_fields() -> None:
    from qywx_ray.settings import Settings

    env = _env(_compose()["services"]["ray-head"])
    for key in env:
        if not key.startswith("QYWX_") or key in ("QYWX_PROFILE", "QYWX_CONFIG"):
            continue
        model: Any = Settings
        for part in key[len("QYWX_") :].lower().split("__"):
            assert part in model.model_fields, key
            model = model.model_fields[part].annotation


def test_referenced_files_exist() -> None:
    compose = _compose()
    named = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src}"
            else:
                assert src in named, f"{name}: undeclared volume {src}"
    prom = compose["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./deploy/prometheus/alerts.yml:") for v in prom)
    assert any(v.startswith("ray-tmp:/tmp/ray") for v in prom)
    assert any(v.startswith("ray-tmp:/tmp/ray") for v in compose["services"]["ray-head"]["volumes"])


def test_dockerfile_installs_the_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.splitlines()[1].startswith("FROM python:3.11-slim")
    assert "RUN pip install ." in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                # serve/ is the lead's Serve application; it must exist before an image build
                if src != "serve":
                    assert (ROOT / src).exists(), src
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored
    assert ".env" in ignored
    assert "tests" in ignored


def test_docker_compose_config_when_available() -> None:
    docker = shutil.which("docker")
    ok = docker is not None and (
        subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode
        == 0
    )
    if not ok:
        pytest.skip("no docker compose plugin on this machine; structure checked above")
    assert docker is not None
    env = dict(os.environ)
    for key in (
        "QYWX_WECOM__CORP_ID",
        "QYWX_WECOM__TOKEN",
        "QYWX_WECOM__ENCODING_AES_KEY",
        "QYWX_WECOM__KF_SECRET",
        "QYWX_ADMIN__TOKEN",
        "RAY_AUTH_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
    ):
        env.setdefault(key, "x")
    res = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr


# Published ports that WeCom must reach: the Serve proxy and the ingress replicas' own ports.
PUBLIC_PORTS = {"8000:8000", "30000-30010:30000-30010"}


def test_only_the_ingress_is_published_on_every_interface() -> None:
    """Issue 16: the dashboard (job submission), Prometheus and Grafana were published on
    0.0.0.0; everything but the WeCom ingress is on the host's loopback now."""
    services = _compose()["services"]
    published: dict[str, list[str]] = {
        name: [str(p) for p in svc.get("ports", [])] for name, svc in services.items()
    }
    public = {p for ports in published.values() for p in ports if not p.startswith("127.0.0.1:")}
    assert public == PUBLIC_PORTS, published
    loopback = {p.split(":")[1] for ports in published.values() for p in ports} - {"8000"}
    assert {"8265", "9090", "3000"} <= loopback
    for name in ("kafka1", "kafka2", "kafka3", "redis-master", "sentinel1"):
        assert not published[name], f"{name} must not be published"


def test_no_secret_has_a_fallback_value() -> None:
    """Every secret comes from .env and compose refuses to start without it: no
    `${VAR:-admin}` (Grafana's password was `admin` when unset)."""
    import re

    text = (ROOT / "docker-compose.yml").read_text()
    uses = re.findall(r"\$\{([A-Z0-9_]+)([^}]*)\}", text)
    secrets = {n for n, _ in uses if re.search("PASSWORD|TOKEN|SECRET|KEY", n)}
    assert {"GRAFANA_ADMIN_PASSWORD", "QYWX_ADMIN__TOKEN", "RAY_AUTH_TOKEN"} <= secrets
    for name, rest in uses:
        if name in secrets:
            assert rest.startswith(":?"), f"${{{name}{rest}}} must be required (:?)"
    grafana = _env(_compose()["services"]["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_dot_env_with_the_secrets_is_never_committed_or_copied() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_every_published_port_is_described_in_the_docs_and_security() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    security = (ROOT / "SECURITY.md").read_text()
    assert "SECURITY.md" in operations
    assert "## What each port exposes" in operations
    table = operations.split("## What each port exposes", 1)[1].split("\n#", 1)[0]
    for svc in _compose()["services"].values():
        for mapping in svc.get("ports", []):
            host_port = str(mapping).split(":")[-2]  # "127.0.0.1:9090:9090" -> "9090"
            assert f"| {host_port} |" in table, host_port
            assert host_port in security, host_port

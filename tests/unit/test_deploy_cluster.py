"""cluster.yaml is a valid `ray up` config by Ray's own schema and says what we rely on."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import validate_config

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def _config() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_cluster_yaml_matches_rays_schema() -> None:
    jsonschema.validate(_config(), json.loads(SCHEMA.read_text()))
    validate_config(_config())  # schema + Ray's own cross-field checks


def test_schema_check_is_not_vacuous() -> None:
    bad = copy.deepcopy(_config())
    bad["available_node_types"]["worker"]["min_wrokers"] = 2  # typo: unknown key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(_config())
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(bad)


def test_head_and_worker_types_and_commands() -> None:
    cfg = _config()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head"
    assert set(types) == {"head", "worker"}
    assert types["worker"]["min_workers"] >= 1
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert any("pip install ~/qywx-ray" in c for c in cfg["setup_commands"])
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert "--metrics-export-port=8080" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "--metrics-export-port=8080" in worker
    for cmds in (head, worker):
        assert "QYWX_PROFILE=production" in cmds
        assert "QYWX_CONFIG=" in cmds


def test_file_mounts_exist_and_placeholders_are_marked() -> None:
    cfg = _config()
    sources = [str(s).split("#")[0].strip() for s in cfg["file_mounts"].values()]
    assert "./config" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
    assert (ROOT / "config" / "production.yaml").exists()
    text = (ROOT / "cluster.yaml").read_text()
    # every AWS identifier that cannot be known here is visibly a placeholder
    for line in text.splitlines():
        if any(k in line for k in ("ImageId", "SubnetIds", "SecurityGroupIds", "KeyName")):
            assert "PLACEHOLDER" in line, line
    assert "secret" not in json.dumps(cfg["provider"]).lower()


def test_ray_dashboard_listens_on_the_head_loopback_only() -> None:
    """Issue 16: `--dashboard-host=0.0.0.0` let anyone in the VPC submit jobs (no auth).
    Operators reach it through `ray dashboard cluster.yaml` (an SSH port-forward)."""
    head = " ".join(_config()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray dashboard cluster.yaml" in text
    assert "8265" not in next(line for line in text.splitlines() if "sg-PLACEHOLDER" in line)


# deploy/cluster.local.yaml (`ray up` on this machine, tests/drills/test_rayup_drill.py)
# must run what cluster.yaml runs. Its only differences in the common sections are these
# ports, so that it never takes another Ray's or a dev Redis's ports on a shared machine.
LOCAL_PORTS = {"6390": "6379", "8077": "8076", "8090": "8080"}
COMMON_SECTIONS = (
    "file_mounts",
    "cluster_synced_files",
    "file_mounts_sync_continuously",
    "rsync_exclude",
    "rsync_filter",
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _local_config_as_aws() -> dict[str, Any]:
    text = (ROOT / "deploy" / "cluster.local.yaml").read_text()
    for local, aws in LOCAL_PORTS.items():
        text = text.replace(local, aws)
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def test_cluster_local_yaml_runs_what_cluster_yaml_runs() -> None:
    """Setup, file mounts, env handling and start commands cannot drift apart."""
    aws, local = _config(), _local_config_as_aws()
    for section in COMMON_SECTIONS:
        assert local.get(section) == aws.get(section), section


def test_cluster_local_yaml_is_a_valid_local_provider_config() -> None:
    raw = yaml.safe_load((ROOT / "deploy" / "cluster.local.yaml").read_text())
    jsonschema.validate(raw, json.loads(SCHEMA.read_text()))
    assert raw["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert raw["auth"]["ssh_user"] != "root"  # `ray stop` on the node: see the file
    start = " ".join(raw["head_start_ray_commands"])
    for local in LOCAL_PORTS:
        assert local in start  # distinct from cluster.yaml's (and Ray's default) ports


def test_drift_check_is_not_vacuous() -> None:
    aws = _config()
    drifted = copy.deepcopy(aws)
    drifted["setup_commands"] = [*aws["setup_commands"], "echo drift"]
    assert drifted["setup_commands"] != _local_config_as_aws()["setup_commands"]

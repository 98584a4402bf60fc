"""Placement options per role, the settings that drive them, and readable actor names."""

from __future__ import annotations

from pathlib import Path

import pytest

from qywx_ray.demo import dashboard_login
from qywx_ray.errors import ConfigError
from qywx_ray.placement import PlacementSettings, actor_options, format_actor_nodes
from qywx_ray.settings import load_settings


def test_default_placement_adds_nothing() -> None:
    assert actor_options(PlacementSettings(), "consumer") == {}


def test_spread_and_custom_resources_per_role() -> None:
    p = PlacementSettings(strategy="SPREAD", resources={"user_host": {"qywx_worker": 1.0}})
    assert actor_options(p, "consumer") == {"scheduling_strategy": "SPREAD"}
    assert actor_options(p, "user_host") == {
        "scheduling_strategy": "SPREAD",
        "resources": {"qywx_worker": 1.0},
    }


def test_placement_from_settings_and_bad_values_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QYWX_PLACEMENT__STRATEGY", "SPREAD")
    s = load_settings(profile="development", allow_default_secrets=True)
    assert s.placement.strategy == "SPREAD"
    monkeypatch.setenv("QYWX_PLACEMENT__STRATEGY", "PACK_SOMEWHERE")
    with pytest.raises(ConfigError):
        load_settings(profile="development", allow_default_secrets=True)
    monkeypatch.delenv("QYWX_PLACEMENT__STRATEGY")
    with pytest.raises(ConfigError):  # an unknown role is a typo, not ignored
        load_settings(
            profile="development",
            overrides={"placement": {"resources": {"hosts": {"x": 1}}}},
            allow_default_secrets=True,
        )


def test_syncer_host_is_one_actor_class_with_a_plain_name() -> None:
    """Before: a new class (and a new Ray actor class definition) on every call, named
    through a __qualname__ patch; hosts now differ only by .options()."""
    from qywx_ray.ingress.syncer_host import SyncerHost, syncer_host_actor_class

    cls = syncer_host_actor_class()
    assert syncer_host_actor_class() is cls
    name = cls.__ray_metadata__.class_name
    assert name == "SyncerHost"
    assert SyncerHost.__module__ == "qywx_ray.ingress.syncer_host"  # by reference, not by value


def test_format_actor_nodes_groups_by_node() -> None:
    rows = [
        {"name": "c0", "node": "aa head", "node_id": "aa", "pid": 1},
        {"name": "h0", "node": "bb", "node_id": "bb", "pid": 2},
        {"name": "c1", "node": "aa head", "node_id": "aa", "pid": 3},
    ]
    assert format_actor_nodes(rows) == "aa head: c0, c1; bb: h0"


def test_dashboard_login_lines(tmp_path: Path) -> None:
    assert "off" in dashboard_login({}, home=tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    text = dashboard_login({}, home=tmp_path)
    assert "ray get-auth-token" in text
    assert "RAY_AUTH_MODE=token ray list actors" in text
    assert "off" in dashboard_login({"RAY_AUTH_MODE": "disabled"}, home=tmp_path)
    assert "get-auth-token" in dashboard_login({"RAY_AUTH_MODE": "token"}, home=tmp_path / "x")


def test_dev_up_takes_ray_nodes_before_or_after_up() -> None:
    from qywx_ray.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["dev", "up", "--ray-nodes", "3"]).ray_nodes == 3
    assert parser.parse_args(["dev", "--ray-nodes", "3", "up"]).ray_nodes == 3
    assert parser.parse_args(["dev", "up"]).ray_nodes == 0

"""End-to-end fixtures: the WeCom simulator process and the Serve ingress on real Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.devstack.procs import free_port, kill_named_actors
from qywx_ray.devstack.simproc import SimulatorProcess
from qywx_ray.kafka.topics import ensure_topics
from qywx_ray.settings import Settings
from tests.helpers.e2e import Ingress


@pytest.fixture
def ingress_factory(
    ray_session: None, make_settings: Callable[..., Settings], tmp_path: Path, unique: str
) -> Iterator[Callable[..., Ingress]]:
    from ray import serve

    from serve.app import deployment

    started: list[Ingress] = []

    def start(**overrides: Any) -> Ingress:
        http_port = free_port()
        sim = SimulatorProcess(
            tmp_path / "sim",
            f"http://127.0.0.1:{http_port}/wecom/callback",
            extra_args=["--users", "0", "--callback-timeout-s", "2"],
        ).start()
        base: dict[str, Any] = {
            "wecom": {"api_base": sim.api_base},
            "consume": {"namespace": f"e2e-{unique}"},
            "ingest": {"sweep_interval_s": 2.0, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        }
        for key, value in overrides.items():
            base[key] = {**base.get(key, {}), **value}
        settings = make_settings(**base)
        ingress = Ingress(settings, sim, http_port)
        started.append(ingress)  # from here on, teardown stops the simulator
        ensure_topics(settings.kafka)
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(deployment(settings), name=f"qywx-{unique}", route_prefix="/")
        return ingress

    yield start
    for ingress in started:
        ingress.sim.stop()
        serve.shutdown()
        kill_named_actors(ingress.settings.ray_namespace)

"""A faithful WeCom kf simulator: gettoken, kf/sync_msg, kf/send_msg(_on_event), callbacks.

Split by concern: state.py (the synchronous, I/O-free core tests and benchmarks drive),
crypto.py (its own callback crypto, never WeComCrypto, so crypto tests compare two
independent implementations), population.py (scripted customers), runtime.py (the asyncio
callback pusher and population loop), app.py (the FastAPI layer) and cli.py
(`python -m qywx_ray.testing.wecomsim --help`). Dev tooling: the product never imports it.
"""

from __future__ import annotations

from qywx_ray.testing.wecomsim.app import make_app
from qywx_ray.testing.wecomsim.cli import parse_mix, parse_rate
from qywx_ray.testing.wecomsim.crypto import sim_decrypt, sim_encrypt, sim_sign
from qywx_ray.testing.wecomsim.population import Population, PopulationConfig
from qywx_ray.testing.wecomsim.runtime import WeComSimulator
from qywx_ray.testing.wecomsim.state import (
    FAULT_KINDS,
    MESSAGE_TYPES,
    FaultRule,
    SimStats,
    WeComSimulatorState,
)

__all__ = [
    "FAULT_KINDS",
    "MESSAGE_TYPES",
    "FaultRule",
    "Population",
    "PopulationConfig",
    "SimStats",
    "WeComSimulator",
    "WeComSimulatorState",
    "make_app",
    "parse_mix",
    "parse_rate",
    "sim_decrypt",
    "sim_encrypt",
    "sim_sign",
]

"""`python -m qywx_ray.testing.wecomsim`: run the simulator as an HTTP server."""

from __future__ import annotations

import argparse
import os
import random

from qywx_ray.testing.wecomsim.app import make_app
from qywx_ray.testing.wecomsim.population import PopulationConfig
from qywx_ray.testing.wecomsim.runtime import WeComSimulator
from qywx_ray.testing.wecomsim.state import WeComSimulatorState
from qywx_ray.wecom.settings import WeComSettings


def parse_rate(text: str) -> float:
    """'2/min', '30/h', '0.5/s' or a bare number (per minute) → messages per minute."""
    num, _, unit = text.partition("/")
    per = {"": 1.0, "min": 1.0, "m": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60, "hour": 1 / 60}
    if unit not in per:
        raise argparse.ArgumentTypeError(f"rate unit must be s, min or h, got {unit!r}")
    return float(num) * per[unit]


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        mix[name.strip()] = float(weight or 1)
    return mix


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    defaults = WeComSettings()
    p = argparse.ArgumentParser(
        prog="python -m qywx_ray.testing.wecomsim", description="Run the WeCom kf simulator."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--callback-url", default=None, help="where to push kf_msg_or_event")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rate", type=parse_rate, default=2.0, help="per user, e.g. 2/min")
    p.add_argument("--open-kfids", default="wkSIMKF000000000000000001", help="comma list")
    p.add_argument("--mix", type=parse_mix, default=None, help="text=0.8,image=0.1,event=0.1")
    p.add_argument("--burst-probability", type=float, default=0.0)
    p.add_argument("--burst-size", type=int, default=10)
    p.add_argument("--attackers", type=int, default=0)
    p.add_argument("--attacker-rate", type=parse_rate, default=600.0)
    p.add_argument("--size-bytes", type=int, default=0)
    p.add_argument(
        "--stamp-created-ms",
        action="store_true",
        help="add sim_created_ms to every population message (latency benchmarks)",
    )
    p.add_argument("--callback-timeout-s", type=float, default=5.0)
    p.add_argument("--corp-id", default=defaults.corp_id)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    env = {
        "token": os.environ.get("QYWX_WECOM__TOKEN"),
        "encoding_aes_key": os.environ.get("QYWX_WECOM__ENCODING_AES_KEY"),
        "kf_secret": os.environ.get("QYWX_WECOM__KF_SECRET"),
    }
    settings = WeComSettings.model_validate(
        {"corp_id": args.corp_id, **{k: v for k, v in env.items() if v}}
    )
    state = WeComSimulatorState.from_settings(settings, rng=random.Random(args.seed))
    population = None
    if args.users > 0 and (args.rate > 0 or args.attackers > 0):
        population = PopulationConfig(
            open_kfids=args.open_kfids.split(","),
            users=args.users,
            rate_per_min=args.rate,
            burst_probability=args.burst_probability,
            burst_size=args.burst_size,
            attackers=args.attackers,
            attacker_rate_per_min=args.attacker_rate,
            size_bytes=args.size_bytes,
            stamp_created_ms=args.stamp_created_ms,
            **({"mix": args.mix} if args.mix else {}),
        )
    sim = WeComSimulator(
        state,
        callback_url=args.callback_url,
        callback_timeout_s=args.callback_timeout_s,
        population=population,
    )
    uvicorn.run(make_app(sim, manage_lifecycle=True), host=args.host, port=args.port)


if __name__ == "__main__":
    main()

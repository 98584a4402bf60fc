"""Scripted customers: `Population.tick(dt_s)` adds the messages due (pure, seedable)."""

from __future__ import annotations

import itertools

from pydantic import BaseModel, Field

from qywx_ray.testing.wecomsim.state import WeComSimulatorState


class PopulationConfig(BaseModel):
    open_kfids: list[str] = Field(default_factory=lambda: ["wkSIMKF000000000000000001"])
    users: int = 100
    rate_per_min: float = 2.0  # messages per user per minute
    mix: dict[str, float] = Field(
        default_factory=lambda: {"text": 0.85, "image": 0.1, "event": 0.05}
    )
    burst_probability: float = 0.0  # per message: chance it comes as a burst
    burst_size: int = 10
    attackers: int = 0
    attacker_rate_per_min: float = 600.0
    size_bytes: int = 0
    # Benchmarks: stamp each message with `sim_created_ms` (unix ms when the population
    # added it), so end-to-end latency can be measured from creation to the handler.
    stamp_created_ms: bool = False


class Population:
    """Scripted customers; `tick(dt_s)` adds the messages due in dt_s (pure, seedable)."""

    def __init__(self, state: WeComSimulatorState, config: PopulationConfig) -> None:
        self.state = state
        self.config = config
        self._types = list(config.mix)
        # Cumulative once: choices(weights=...) would accumulate them on every message
        # (same draws either way, so a seeded run is unchanged).
        self._cum_weights = list(itertools.accumulate(config.mix[t] for t in self._types))
        self._carry = 0.0
        self._attack_carry = 0.0

    def user(self, i: int) -> tuple[str, str]:
        kfids = self.config.open_kfids
        return kfids[i % len(kfids)], f"wmSIMUSER{i:08d}"

    def tick(self, dt_s: float) -> int:
        cfg, rng = self.config, self.state.rng
        self._carry += cfg.users * cfg.rate_per_min * dt_s / 60.0
        due, self._carry = int(self._carry), self._carry - int(self._carry)
        added = 0
        extra = {"sim_created_ms": int(self.state.clock() * 1000)} if cfg.stamp_created_ms else None
        for _ in range(due):
            kf, user = self.user(rng.randrange(max(1, cfg.users)))
            msgtype = rng.choices(self._types, cum_weights=self._cum_weights)[0]
            count = cfg.burst_size if rng.random() < cfg.burst_probability else 1
            added += len(
                self.state.add_messages(kf, user, count, msgtype, cfg.size_bytes, extra=extra)
            )
        self._attack_carry += cfg.attackers * cfg.attacker_rate_per_min * dt_s / 60.0
        due, self._attack_carry = (
            int(self._attack_carry),
            self._attack_carry - int(self._attack_carry),
        )
        for _ in range(due):
            i = rng.randrange(cfg.attackers)
            kf = cfg.open_kfids[i % len(cfg.open_kfids)]
            added += len(self.state.add_messages(kf, f"wmSIMATTACK{i:06d}", 1, "text", extra=extra))
        return added

"""``dp=laplace``: clip each update to L1 norm ``dp.sensitivity`` and add Laplace
noise of scale ``sensitivity / epsilon`` per coordinate to the sum (pure
epsilon-DP per round)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import dp_accounting
from dp_accounting import DpEvent

from fedsim.aggregation.base import Aggregator
from fedsim.config import DPConfig, SimConfig
from fedsim.privacy import noise
from fedsim.privacy.mechanisms.base import Mechanism


class Laplace(Mechanism):
    name = "laplace"

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        return dp_accounting.LaplaceDpEvent(1.0 / dp.epsilon)

    def calibration_event(self, value: float) -> DpEvent:
        """The searched parameter is the Laplace noise multiplier 1 / epsilon."""
        return dp_accounting.LaplaceDpEvent(value)

    def calibrated(self, cfg: SimConfig, value: float) -> DPConfig:
        return dataclasses.replace(cfg.dp, epsilon=1.0 / value)

    def noise_sampler(self, dp: DPConfig) -> str:
        return noise.LAPLACE_SAMPLER

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        from fedsim.privacy.queries import DPQueryAggregator

        return DPQueryAggregator(cfg.dp, cfg.clients_per_round)

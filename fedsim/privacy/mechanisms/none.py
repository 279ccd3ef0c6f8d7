"""``dp=none``: the plain (weighted) mean, no noise, nothing to account."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from fedsim.aggregation.base import Aggregator, MeanAggregator
from fedsim.config import DPConfig, SimConfig
from fedsim.privacy.mechanisms.base import Mechanism

if TYPE_CHECKING:
    from dp_accounting import DpEvent


class NoMechanism(Mechanism):
    name = "none"
    private = False
    calibratable = False

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        import dp_accounting

        return dp_accounting.NoOpDpEvent()

    def noise_sampler(self, dp: DPConfig) -> str:
        return "none"

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        return MeanAggregator(cfg.server.weighting)

"""``dp=gaussian``: TFF's ``DifferentiallyPrivateFactory.gaussian_fixed``.

Each client's update is clipped to L2 norm ``dp.l2_norm_clip`` (C); the server
adds N(0, (z C)^2) per coordinate to the sum once and divides by
``clients_per_round``. With ``dp.noise_sampler=discrete_gaussian`` (under
secure aggregation) the noise is the exact discrete Gaussian on the integer sum
instead (:mod:`fedsim.privacy.discrete_gaussian`), accounted without sampling
amplification.
"""

from __future__ import annotations

from typing import Optional

import dp_accounting
from dp_accounting import DpEvent

from fedsim.aggregation.base import Aggregator
from fedsim.config import DPConfig, SimConfig
from fedsim.privacy.events import DiscreteGaussianDpEvent
from fedsim.privacy.mechanisms.base import Mechanism


class Gaussian(Mechanism):
    name = "gaussian"

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        if dp.noise_sampler == "discrete_gaussian":
            return DiscreteGaussianDpEvent(dp.noise_multiplier)
        return dp_accounting.GaussianDpEvent(dp.noise_multiplier)

    def noise_sampler(self, dp: DPConfig) -> str:
        if dp.noise_sampler == "discrete_gaussian":
            from fedsim.privacy.discrete_noise import DISCRETE_GAUSSIAN_SAMPLER

            return DISCRETE_GAUSSIAN_SAMPLER
        return super().noise_sampler(dp)

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        if cfg.dp.noise_sampler == "discrete_gaussian":
            from fedsim.privacy.discrete_gaussian import DiscreteGaussianAggregator

            return DiscreteGaussianAggregator(cfg.dp, cfg.clients_per_round)
        from fedsim.privacy.queries import DPQueryAggregator

        return DPQueryAggregator(cfg.dp, cfg.clients_per_round)

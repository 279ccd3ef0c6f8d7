"""``dp=distributed_skellam`` (Agarwal, Kairouz, Liu 2021): every client clips,
rounds to integers and adds its share of Skellam noise inside secure
aggregation, so the server never sees an un-noised sum
(:mod:`fedsim.privacy.skellam`)."""

from __future__ import annotations

from typing import Optional

from dp_accounting import DpEvent

from fedsim.aggregation.base import Aggregator
from fedsim.config import DPConfig, SimConfig
from fedsim.privacy import noise
from fedsim.privacy.mechanisms.base import Mechanism
from fedsim.privacy.skellam import SkellamAggregator, worst_noise_shares


class DistributedSkellam(Mechanism):
    name = "distributed_skellam"
    secure_sum = "required"
    calibratable = False
    needs_model_size = True

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        if dim is None:
            raise ValueError("the distributed Skellam event depends on the model size (dim)")
        agg = SkellamAggregator(dp, precision_bits, clients_per_round)
        return agg.event(clients_per_round if noise_shares is None else noise_shares, dim)

    def worst_round_event(self, cfg: SimConfig, dim: Optional[int]) -> DpEvent:
        """The sum with the fewest noise shares a completed round can hold."""
        return self.round_event(cfg.dp, cfg.clients_per_round, dim=dim,
                                precision_bits=cfg.secagg.precision_bits,
                                noise_shares=worst_noise_shares(cfg))

    def noise_sampler(self, dp: DPConfig) -> str:
        return noise.SKELLAM_SAMPLER

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        return SkellamAggregator(cfg.dp, cfg.secagg.precision_bits, cfg.clients_per_round)

"""``dp=gaussian_adaptive``: TFF's ``DifferentiallyPrivateFactory.gaussian_adaptive``
(Andrew et al. 2021): the clip norm follows a quantile of the update norms,
estimated from a noised count; the total noise multiplier z is split between the
sum and the count (:func:`fedsim.privacy.noise.adaptive_clip_noise_params`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import dp_accounting
from dp_accounting import DpEvent

from fedsim.aggregation.base import Aggregator
from fedsim.config import DPConfig, SimConfig
from fedsim.errors import ConfigError
from fedsim.privacy.mechanisms.base import Mechanism
from fedsim.privacy.noise import adaptive_clip_noise_params


class GaussianAdaptive(Mechanism):
    name = "gaussian_adaptive"

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        z_sum, count_std = adaptive_clip_noise_params(dp.noise_multiplier,
                                                      float(clients_per_round),
                                                      dp.clipped_count_stddev)
        # Two Gaussians whose composition is exactly one of multiplier z.
        return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_sum),
                                              dp_accounting.GaussianDpEvent(count_std / 0.5)])

    def calibrated(self, cfg: SimConfig, value: float) -> DPConfig:
        return calibrated_adaptive(cfg, value)

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        from fedsim.privacy.queries import DPQueryAggregator

        return DPQueryAggregator(cfg.dp, cfg.clients_per_round)


def calibrated_adaptive(cfg: SimConfig, value: float) -> DPConfig:
    """``cfg.dp`` with the total noise multiplier ``value``, refused (one line) when
    it is too small to split with the count's std (TFF's condition)."""
    dp = cfg.dp
    count_std = (dp.clipped_count_stddev if dp.clipped_count_stddev is not None
                 else 0.05 * cfg.clients_per_round)
    if value >= 2 * count_std:
        raise ConfigError("dp.target_epsilon", f"a budget that needs a noise multiplier "
                          f"below 2 * clipped_count_stddev = {2 * count_std:g} (it needs "
                          f"{value:.4g}); raise dp.target_epsilon or dp.clipped_count_stddev",
                          dp.target_epsilon)
    return dataclasses.replace(dp, noise_multiplier=value)

"""``dp=tree_adaptive``: TFF's ``DifferentiallyPrivateFactory.tree_adaptive``:
DP-FTRL's tree aggregation with the clip following a quantile of the update
norms (Andrew et al. 2021), estimated from a tree-noised count; the estimate is
adopted as the clip only when the tree restarts. The total noise multiplier z
is split as ``gaussian_adaptive`` splits it (the count's std defaults to
clients_per_round / 20, as TFF's); both trees are accounted as
:mod:`fedsim.privacy.mechanisms.tree_aggregation` accounts one."""

from __future__ import annotations

from fedsim.config import DPConfig, SimConfig
from fedsim.privacy.mechanisms.gaussian_adaptive import calibrated_adaptive
from fedsim.privacy.mechanisms.tree_aggregation import TreeAggregation
from fedsim.privacy.noise import adaptive_clip_noise_params


def _count_std(dp: DPConfig, clients_per_round: int) -> float:
    return (dp.clipped_count_stddev if dp.clipped_count_stddev is not None
            else clients_per_round / 20.0)


class TreeAdaptive(TreeAggregation):
    name = "tree_adaptive"
    adaptive = True

    def noise_multipliers(self, dp: DPConfig, clients_per_round: int) -> list[float]:
        z_sum, count_std = adaptive_clip_noise_params(dp.noise_multiplier, clients_per_round,
                                                      _count_std(dp, clients_per_round))
        return [z_sum, count_std / 0.5]  # the count's records are +-0.5

    def calibrated(self, cfg: SimConfig, value: float) -> DPConfig:
        return calibrated_adaptive(cfg, value)

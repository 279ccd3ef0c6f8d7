"""Builds the parts of a run that the config names (the factories the actors call)."""

from __future__ import annotations

from fedsim.aggregation.base import Aggregator, MeanAggregator
from fedsim.config import SimConfig


def build_aggregator(cfg: SimConfig) -> Aggregator:
    """The aggregator that ``cfg.dp`` and ``cfg.server.weighting`` ask for.

    ``dp.mechanism=none``: the (weighted) mean. Otherwise a differentially
    private aggregator (:mod:`fedsim.privacy.queries`), which imports TensorFlow.
    ``aggregator.kind=tff``: a TFF aggregation factory run by
    :class:`fedsim.interop.tff.TFFAggregator` (cheap to build: TFF is only
    imported in the server actor, when it is first used).
    """
    if cfg.aggregator.kind == "tff":
        from fedsim.interop.tff import build_tff_aggregator

        return build_tff_aggregator(cfg)
    if cfg.dp.mechanism == "none":
        return MeanAggregator(cfg.server.weighting)
    if cfg.dp.mechanism == "distributed_skellam":
        from fedsim.privacy.skellam import SkellamAggregator

        return SkellamAggregator(cfg.dp, cfg.secagg.precision_bits, cfg.clients_per_round)
    if cfg.dp.noise_sampler == "discrete_gaussian":
        from fedsim.privacy.discrete_gaussian import DiscreteGaussianAggregator

        return DiscreteGaussianAggregator(cfg.dp, cfg.clients_per_round)
    from fedsim.privacy.queries import build_dp_aggregator

    return build_dp_aggregator(cfg)

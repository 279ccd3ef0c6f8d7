"""What each client trainer honours of an algorithm's client payload
(:meth:`fedsim.algorithms.base.Algorithm.client_payload`); TF-free, so the
driver can refuse an algorithm a trainer cannot run before any actor starts."""

from __future__ import annotations

from fedsim.config import SimConfig

PROXIMAL_MU = "proximal_mu"
"""FedProx's ``mu``: the local objective gains ``mu/2 ||w - w_global||^2``."""


def trainer_features(cfg: SimConfig) -> frozenset[str]:
    """The payload keys the trainer that ``cfg.client`` selects honours: the
    one-at-a-time trainer takes ``proximal_mu``; the vectorized and the DP-SGD
    trainers take none (a proximal term would change DP-SGD's sensitivity
    analysis, and the vectorized trainer's fused steps)."""
    if cfg.client.optimizer == "dp_sgd" or cfg.client.vectorize > 1:
        return frozenset()
    return frozenset({PROXIMAL_MU})

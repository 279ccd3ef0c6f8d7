"""What each client trainer honours of an algorithm's options
(:meth:`fedsim.algorithms.base.Algorithm.client_update` passes them to the
trainer); TF-free, so the driver can refuse an algorithm a trainer cannot run
before any actor starts."""

from __future__ import annotations

from fedsim.config import SimConfig

PROXIMAL_MU = "proximal_mu"
"""FedProx's ``mu``: the local objective gains ``mu/2 ||w - w_global||^2``."""
CORRECTION = "correction"
"""SCAFFOLD's ``c - c_i``: a vector added to every local step's gradient."""
FROZEN_MOMENTUM = "frozen_momentum"
"""Mime-Lite's server momentum: every local step uses it, never updates it."""
FULL_GRADIENT = "full_gradient"
"""Mime-Lite's full-batch gradient at the global weights, returned with the update."""

LOCAL_TRAINER_FEATURES = frozenset({PROXIMAL_MU, CORRECTION, FROZEN_MOMENTUM, FULL_GRADIENT})


def trainer_features(cfg: SimConfig) -> frozenset[str]:
    """The options the trainer that ``cfg.client`` selects honours: the
    one-at-a-time trainer takes them all; the vectorized and the DP-SGD
    trainers take none (a proximal term or a correction would change DP-SGD's
    sensitivity analysis, and the vectorized trainer's fused steps)."""
    if cfg.client.optimizer == "dp_sgd" or cfg.client.per_call > 1:
        return frozenset()
    return LOCAL_TRAINER_FEATURES

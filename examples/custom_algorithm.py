"""A user's own federated algorithm, plugged into fedsim without editing it: a
FedProx sketch (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020).

FedProx is FedAvg whose clients minimise their loss plus the proximal term
``mu/2 ||w - w_global||^2``, which keeps heterogeneous clients near the global
model. The algorithm sends ``proximal_mu`` to every client (its
``client_payload``); fedsim's one-at-a-time trainer honours it. On the server it
is FedAvg (with ``server.optimizer``)::

    PYTHONPATH=. uv run python scripts/simulate.py algorithm=examples.custom_algorithm:fedprox

From Python: ``run_simulation(cfg, algorithm=FedProx(cfg, mu=0.1))`` (see :func:`main`).
(fedsim's own FedProx, with TFF parity tests, belongs in ``fedsim/algorithms/``.)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedsim.algorithms.base import Algorithm, State
from fedsim.algorithms.fedavg import FedAvg
from fedsim.config import SimConfig


class FedProx(Algorithm):
    """FedAvg on the server; ``mu`` (>= 0) for the clients' proximal term."""

    client_features = frozenset({"proximal_mu"})

    def __init__(self, cfg: SimConfig, mu: float = 0.01) -> None:
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self.server = FedAvg(cfg)

    def initial_state(self, weights: np.ndarray) -> State:
        return self.server.initial_state(weights)

    def client_payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"proximal_mu": self.mu}

    def apply(self, state: Mapping[str, Any], weights: np.ndarray,
              aggregate: np.ndarray) -> tuple[State, np.ndarray]:
        return self.server.apply(state, weights, aggregate)


def fedprox(cfg: SimConfig) -> FedProx:
    """The Hydra entry point (``algorithm=examples.custom_algorithm:fedprox``): mu 0.01."""
    return FedProx(cfg, mu=0.01)


def main(rounds: int = 3, mu: float = 0.1, actors: Any = None) -> Any:
    """FedProx on strongly label-skewed digits (Dirichlet 0.1), from Python."""
    from fedsim.config import DataConfig, ModelConfig, RayConfig
    from fedsim.simulation import run_simulation

    cfg = SimConfig(clients=30, clients_per_round=10, rounds=rounds, local_epochs=2,
                    data=DataConfig(name="digits", alpha=0.1), model=ModelConfig(name="logreg"),
                    ray=RayConfig(workers=1), progress=False)
    result = run_simulation(cfg, algorithm=FedProx(cfg, mu=mu), actors=actors)
    print(f"FedProx mu={mu}: accuracy {result.summary['final']['eval_accuracy']:.3f} "
          f"after {rounds} rounds")
    return result


if __name__ == "__main__":
    main()

"""A user's own federated algorithm, plugged into fedsim without editing it:
FedProx whose proximal strength decays over the rounds, ``mu_t = mu / sqrt(t)``
(a strong pull toward the global model early, when heterogeneous clients drift
most, fading to FedAvg).

The algorithm keeps the round count in its state (state flows in and out of
``apply``), sends ``proximal_mu`` to every client (``client_payload``; fedsim's
one-at-a-time trainer honours it, see ``client_features``), and is FedAvg with
``server.optimizer`` on the server. fedsim's own FedProx (``algorithm=fedprox``,
checked against TFF's) is :mod:`fedsim.algorithms.fedprox`. From Hydra::

    PYTHONPATH=. uv run python scripts/simulate.py \
        algorithm.name=examples.custom_algorithm:DecayingProx +algorithm.args.mu=0.1

From Python: ``run_simulation(cfg, algorithm=DecayingProx(cfg, mu=0.1))`` (see :func:`main`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from fedsim.algorithms.base import Algorithm, State
from fedsim.algorithms.fedavg import FedAvg
from fedsim.config import SimConfig


class DecayingProx(Algorithm):
    """FedAvg on the server; ``mu / sqrt(round)`` for the clients' proximal term."""

    client_features = frozenset({"proximal_mu"})

    def __init__(self, cfg: SimConfig, mu: float = 0.01) -> None:
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        self.mu = float(mu)
        self.server = FedAvg(cfg)

    def initial_state(self, weights: np.ndarray) -> State:
        return {"round": 1, "server": self.server.initial_state(weights)}

    def client_payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"proximal_mu": self.mu / math.sqrt(state["round"])}

    def apply(self, state: Mapping[str, Any], weights: np.ndarray, aggregate: np.ndarray,
              sums: Mapping[str, tuple[np.ndarray, float]]) -> tuple[State, np.ndarray]:
        server, new_weights = self.server.apply(state["server"], weights, aggregate, sums)
        return {"round": state["round"] + 1, "server": server}, new_weights


def main(rounds: int = 3, mu: float = 0.1, actors: Any = None) -> Any:
    """The decaying proximal term on strongly label-skewed digits (Dirichlet 0.1)."""
    from fedsim.config import DataConfig, ModelConfig, RayConfig
    from fedsim.simulation import run_simulation

    cfg = SimConfig(clients=30, clients_per_round=10, rounds=rounds, local_epochs=2,
                    data=DataConfig(name="digits", alpha=0.1), model=ModelConfig(name="logreg"),
                    ray=RayConfig(workers=1), progress=False)
    result = run_simulation(cfg, algorithm=DecayingProx(cfg, mu=mu), actors=actors)
    print(f"DecayingProx mu={mu}: accuracy {result.summary['final']['eval_accuracy']:.3f} "
          f"after {rounds} rounds")
    return result


if __name__ == "__main__":
    main()

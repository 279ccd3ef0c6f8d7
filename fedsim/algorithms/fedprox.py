"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020), as TFF's ``build_weighted_fed_prox`` / ``build_unweighted_fed_prox``:
every client minimises its loss plus ``mu/2 ||w - w_global||^2`` (each local
step's gradient gains ``mu (w - w_global)``); on the server it is FedAvg with
``server.optimizer``. ``mu = 0`` is FedAvg."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from fedsim.algorithms.fedavg import FedAvg
from fedsim.client.features import PROXIMAL_MU
from fedsim.config import SimConfig


class FedProx(FedAvg):
    name = "fedprox"
    client_features = frozenset({PROXIMAL_MU})

    def __init__(self, cfg: SimConfig, mu: Optional[float] = None) -> None:
        super().__init__(cfg)
        self.mu = float(cfg.algorithm.mu if mu is None else mu)
        if not self.mu >= 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}")

    def client_payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {PROXIMAL_MU: self.mu}

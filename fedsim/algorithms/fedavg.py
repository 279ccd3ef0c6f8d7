"""FedAvg with a server optimizer (TFF's ``build_weighted_fed_avg`` /
``build_unweighted_fed_avg``): the aggregate is the mean client delta, applied
as a pseudo-gradient by ``server.optimizer`` (sgd: FedAvg / FedAvgM; adam:
FedAdam; yogi: FedYogi; adagrad: FedAdagrad; :mod:`fedsim.algorithms.optimizers`)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedsim.algorithms.base import Algorithm, State
from fedsim.algorithms.optimizers import ServerOptimizer
from fedsim.config import ServerConfig, SimConfig


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, cfg: SimConfig | ServerConfig) -> None:
        server = cfg.server if isinstance(cfg, SimConfig) else cfg
        self.optimizer = ServerOptimizer(server)

    def initial_state(self, weights: np.ndarray) -> State:
        return self.optimizer.initial_state(int(np.asarray(weights).size))

    def apply(self, state: Mapping[str, Any], weights: np.ndarray, aggregate: np.ndarray,
              sums: Mapping[str, tuple[np.ndarray, float]]) -> tuple[State, np.ndarray]:
        return self.optimizer.step(dict(state), weights, aggregate)

"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020), option II, with every client's control
variate kept on disk (:mod:`fedsim.client.state`).

With global weights ``x``, server control variate ``c`` and client ``i``'s
``c_i`` (zeros before it first trains), client ``i`` takes its K local SGD
steps ``y <- y - lr (g(y) - c_i + c)`` (K = local_epochs * ceil(n_i /
batch_size), lr = client.learning_rate), then

    c_i+ = c_i - c + (x - y) / (K lr)

and sends ``x - y`` (the aggregator's update) and ``c_i+ - c_i``. The server
applies the mean update with ``server.optimizer`` (sgd at learning rate
``eta_g`` is the paper's ``x <- x + eta_g mean(y - x)``) and sets
``c <- c + sum_i (c_i+ - c_i) / N`` over the clients that reported, N the
population (the paper's ``|S| / N`` times the mean; pfl-research's rule).
A client whose update is not finite keeps its ``c_i`` and adds nothing to ``c``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from fedsim.algorithms.base import Algorithm, ClientOutput, State
from fedsim.algorithms.optimizers import ServerOptimizer
from fedsim.client.features import CORRECTION
from fedsim.config import SimConfig

CONTROL = "control"
CONTROL_DELTA = "control_delta"


class Scaffold(Algorithm):
    name = "scaffold"
    client_features = frozenset({CORRECTION})

    def __init__(self, cfg: SimConfig) -> None:
        self.optimizer = ServerOptimizer(cfg.server)
        self.population = int(cfg.clients)
        self.learning_rate = float(cfg.client.learning_rate)
        self.batch_size = int(cfg.batch_size)
        self.local_epochs = int(cfg.local_epochs)

    def client_state_fields(self, num_parameters: int) -> dict[str, int]:
        return {CONTROL: int(num_parameters)}

    def initial_state(self, weights: np.ndarray) -> State:
        size = int(np.asarray(weights).size)
        return {"server": self.optimizer.initial_state(size),
                CONTROL: np.zeros(size, np.float32)}

    def client_payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {CONTROL: state[CONTROL]}

    def local_steps(self, num_examples: int) -> int:
        """K: the client's local SGD steps this round."""
        return self.local_epochs * math.ceil(num_examples / self.batch_size)

    def client_update(self, train: Callable[..., Any], payload: Mapping[str, Any],
                      client_state: Mapping[str, np.ndarray]) -> ClientOutput:
        c = np.asarray(payload[CONTROL], np.float32)
        c_i = np.asarray(client_state[CONTROL], np.float32)
        result = train(correction=c - c_i)
        steps = self.local_steps(result.num_examples)
        if steps == 0 or not np.isfinite(result.delta).all():
            return ClientOutput(result)
        new_c_i = (c_i.astype(np.float64) - c + result.delta.astype(np.float64)
                   / (steps * self.learning_rate)).astype(np.float32)
        change = new_c_i.astype(np.float64) - c_i
        return ClientOutput(result, {CONTROL_DELTA: (change, 1.0)}, {CONTROL: new_c_i})

    def apply(self, state: Mapping[str, Any], weights: np.ndarray, aggregate: np.ndarray,
              sums: Mapping[str, tuple[np.ndarray, float]]) -> tuple[State, np.ndarray]:
        server, new_weights = self.optimizer.step(dict(state["server"]), weights, aggregate)
        control = np.asarray(state[CONTROL], np.float32)
        if CONTROL_DELTA in sums:
            control = (control + sums[CONTROL_DELTA][0] / self.population).astype(np.float32)
        return {"server": server, CONTROL: control}, new_weights

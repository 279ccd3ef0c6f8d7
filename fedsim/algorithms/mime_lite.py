"""Mime-Lite (Karimireddy et al., "Breaking the centralized barrier for
cross-device federated learning", NeurIPS 2021), as TFF's
``build_weighted_mime_lite`` / ``build_unweighted_mime_lite`` with the base
optimizer SGD with momentum (TFF's ``build_sgdm(client.learning_rate,
client.momentum)``):

- every client first computes its full-batch gradient ``g_i`` at the global
  weights, then trains with the server's momentum buffer ``a`` fixed:
  ``w <- w - lr (momentum * a + g)`` per step (TFF's ``optimizer.next`` on the
  broadcast state, whose new state is dropped);
- the server averages the deltas (``server.weighting``; a client whose delta is
  not finite weighs 0, as TFF's) and the full gradients with the same weights,
  updates ``a <- momentum * a + mean(g_i)`` (the base optimizer's state
  update), and applies the mean delta with ``server.optimizer`` (TFF's default
  is sgd with learning rate 1.0).

With ``client.momentum = 0`` the base optimizer has no state and Mime-Lite is
FedAvg (the clients still compute the full gradient, as TFF's do).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from fedsim.algorithms.base import Algorithm, ClientOutput, State
from fedsim.algorithms.optimizers import ServerOptimizer
from fedsim.client.features import FROZEN_MOMENTUM, FULL_GRADIENT
from fedsim.config import SimConfig


class MimeLite(Algorithm):
    name = "mime_lite"
    client_features = frozenset({FROZEN_MOMENTUM, FULL_GRADIENT})

    def __init__(self, cfg: SimConfig) -> None:
        self.optimizer = ServerOptimizer(cfg.server)
        self.momentum = float(cfg.client.momentum)
        self.weighted = cfg.server.weighting == "num_examples"

    def initial_state(self, weights: np.ndarray) -> State:
        size = int(np.asarray(weights).size)
        state: State = {"server": self.optimizer.initial_state(size)}
        if self.momentum > 0:
            state["momentum_buffer"] = np.zeros(size, np.float32)
        return state

    def client_payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        buffer = state.get("momentum_buffer")
        return {} if buffer is None else {FROZEN_MOMENTUM: buffer}

    def client_update(self, train: Callable[..., Any], payload: Mapping[str, Any],
                      client_state: Mapping[str, np.ndarray]) -> ClientOutput:
        result = train(full_gradient=True, **payload)
        finite = bool(np.isfinite(result.delta).all())
        w = (float(result.num_examples) if self.weighted else 1.0) if finite else 0.0
        full = w * result.full_gradient.astype(np.float64)
        return ClientOutput(result, {FULL_GRADIENT: (full, w)})

    def apply(self, state: Mapping[str, Any], weights: np.ndarray, aggregate: np.ndarray,
              sums: Mapping[str, tuple[np.ndarray, float]]) -> tuple[State, np.ndarray]:
        server, new_weights = self.optimizer.step(dict(state["server"]), weights, aggregate)
        out: State = {"server": server}
        if "momentum_buffer" in state:
            total, weight = sums.get(FULL_GRADIENT, (np.zeros(weights.size), 0.0))
            mean = (total / weight if weight > 0 else np.zeros_like(total)).astype(np.float32)
            out["momentum_buffer"] = (np.float32(self.momentum) * state["momentum_buffer"]
                                      + mean)
        return out, new_weights

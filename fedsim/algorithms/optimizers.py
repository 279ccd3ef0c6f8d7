"""Server optimizers over the flat weight vector (numpy), with explicit state.

The server treats the aggregated client delta (``global - local``, averaged) as
a pseudo-gradient ``g`` and takes one optimizer step on the global weights, as
TFF's ``build_weighted_fed_avg`` does with ``tff.learning.optimizers``. The
formulas and defaults are TFF's:

- ``sgd``: ``a <- momentum * a + g; w <- w - lr * a`` (no accumulator when
  momentum is 0). lr 1.0 without momentum is plain FedAvg.
- ``adam`` (FedAdam): ``a <- a + (g - a)(1 - b1); p <- p + (g^2 - p)(1 - b2);
  w <- w - lr * sqrt(1 - b2^t) / (1 - b1^t) * a / (sqrt(p) + eps)``, eps 1e-7.
- ``yogi`` (FedYogi): as adam but ``p <- p + (1 - b2) * sign(g^2 - p) * g^2``,
  p starting at ``initial_preconditioner`` (1e-6), eps 1e-3.
- ``adagrad`` (FedAdagrad): ``p <- p + g^2; w <- w - lr * g / sqrt(p + eps)``,
  p starting at ``initial_preconditioner`` (0.1), eps 1e-7 (inside the square
  root, as TFF's ``build_adagrad``; Keras' Adagrad adds it outside).

State is a dict of numpy arrays and numbers, so it can be checkpointed; ``step``
never mutates its inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.config import ServerConfig

State = dict[str, Any]


class ServerOptimizer:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.kind = cfg.optimizer
        if cfg.epsilon is not None:
            self.eps = cfg.epsilon
        else:
            self.eps = 1e-3 if cfg.optimizer == "yogi" else 1e-7
        if cfg.initial_preconditioner is not None:
            self.initial_preconditioner = cfg.initial_preconditioner
        else:
            self.initial_preconditioner = 0.1 if cfg.optimizer == "adagrad" else 1e-6

    def initial_state(self, size: int) -> State:
        state: State = {"step": 0}
        if self.kind == "sgd" and self.cfg.momentum > 0:
            state["accumulator"] = np.zeros(size, np.float32)
        elif self.kind in ("adam", "yogi"):
            state["accumulator"] = np.zeros(size, np.float32)
            init = self.initial_preconditioner if self.kind == "yogi" else 0.0
            state["preconditioner"] = np.full(size, init, np.float32)
        elif self.kind == "adagrad":
            state["preconditioner"] = np.full(size, self.initial_preconditioner, np.float32)
        return state

    def step(self, state: State, weights: np.ndarray, grad: np.ndarray) -> tuple[State, np.ndarray]:
        """One step: returns (new state, new weights)."""
        lr = np.float32(self.cfg.learning_rate)
        t = state["step"] + 1
        g = grad.astype(np.float32)
        if self.kind == "sgd":
            if "accumulator" in state:
                a = np.float32(self.cfg.momentum) * state["accumulator"] + g
                return {"step": t, "accumulator": a}, weights - lr * a
            return {"step": t}, weights - lr * g
        if self.kind == "adagrad":
            p = state["preconditioner"] + g * g
            new_w = weights - lr * g / np.sqrt(p + np.float32(self.eps))
            return {"step": t, "preconditioner": p}, new_w.astype(np.float32)
        b1, b2 = np.float32(self.cfg.beta_1), np.float32(self.cfg.beta_2)
        a = state["accumulator"] + (g - state["accumulator"]) * (1 - b1)
        g2 = g * g
        if self.kind == "adam":
            p = state["preconditioner"] + (g2 - state["preconditioner"]) * (1 - b2)
        else:
            p = state["preconditioner"] + (1 - b2) * np.sign(g2 - state["preconditioner"]) * g2
        norm_lr = np.float32(lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t))
        new_w = weights - norm_lr * a / (np.sqrt(p) + np.float32(self.eps))
        return {"step": t, "accumulator": a, "preconditioner": p}, new_w.astype(np.float32)

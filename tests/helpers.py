"""Shared pieces of the simulation tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedsim.config import ModelConfig, RayConfig, SimConfig
from fedsim.results.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "simulate.py"

# Per-round keys that measure time, not results.
TIMINGS = {"round_seconds", "eval_seconds", "secagg_seconds"}


def small_config(**kw) -> SimConfig:
    """A quick simulation: 20 clients, 5 per round, 3 rounds of logreg on 1 worker
    (each worker actor costs a TensorFlow start-up; tests of several workers ask)."""
    base = dict(clients=20, clients_per_round=5, rounds=3, local_epochs=1, batch_size=10,
                model=ModelConfig(name="logreg"), ray=RayConfig(workers=1), progress=False)
    base.update(kw)
    return SimConfig(**base)


def without_timings(rows, also=()):
    """Metrics rows without the timing keys (and ``also``): what a rerun must reproduce."""
    drop = TIMINGS | set(also)
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def simulate(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``scripts/simulate.py`` with ``args`` as a user would (a fresh process)."""
    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def logreg_local_sgd(w0, x, y, order, batch, epochs, lr, k, mu=0.0, correction=None):
    """A client's local SGD on softmax regression (fedsim's logreg: Flatten ->
    Dense(k); flat weights kernel (d, k) row-major, then bias), in float64, in
    the batches fedsim's trainer cuts from ``order``: each step's gradient of the
    batch's mean loss gains FedProx's ``mu (w - w0)`` and ``correction``
    (SCAFFOLD's ``c - c_i``). Returns the model delta ``w0 - w``."""
    d = x[0].size
    w = w0.astype(np.float64).copy()
    start = w.copy()
    corr = 0.0 if correction is None else np.asarray(correction, np.float64)
    flat_x = x.reshape(len(x), -1).astype(np.float64)
    n = len(x)
    steps = -(-n // batch)
    for step in range(steps * epochs):
        e, s = divmod(step, steps)
        idx = order[e * n + s * batch: min(e * n + (s + 1) * batch, (e + 1) * n)]
        xb, yb = flat_x[idx], y[idx]
        kernel, bias = w[:d * k].reshape(d, k), w[d * k:]
        z = xb @ kernel + bias
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0
        grad = np.concatenate([(xb.T @ p / len(yb)).ravel(), p.mean(axis=0)])
        w = w - lr * (grad + mu * (w - start) + corr)
    return start - w


class DiesAfterRound(Callback):
    """The driver "dies" at the end of round ``at``: after the server applied the
    round and committed its client states, before any checkpoint of it. (Raising
    here would do the same, but a failed run's warm actors are dropped and new
    ones cost a TensorFlow start-up each; instead the run's checkpoints are
    switched off from here on and it stops before the next round.)"""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_round_end(self, ctx, row) -> None:
        if row["round"] == self.at:
            ctx.checkpoint = lambda rnd: None

    def stop_before_round(self, ctx, round_num):
        return "died" if round_num > self.at else None

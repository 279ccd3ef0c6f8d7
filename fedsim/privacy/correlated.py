"""Matrix-factorization mechanisms (Choquette-Choo et al. 2023; Dvijotham et al.
2024) in fedsim's aggregation protocol, and what their mechanisms share.

The workload is the prefix sums of the rounds' clipped sums (the model under
server SGD). A strategy ``C`` (lower-triangular Toeplitz, n = ``rounds``) is
chosen once (:mod:`fedsim.privacy.matrix_factorization`); the mechanism releases
``C X + Z`` with ``Z`` i.i.d. N(0, (z C_clip sens(C))^2) per coordinate, which is
the same as adding the correlated noise row ``w_t = (C^{-1} Z)_t`` to round t's
sum. The server keeps what ``C^{-1}`` needs of the past, never the whole history:
the last ``bands - 1`` noise rows (banded) or ``buffers`` buffers (BLT).

Accounting: the whole run is one Gaussian mechanism of noise multiplier z
(zero-out neighbours, a client's updates in all its rounds replaced by zeros).
After r rounds only the first r rows are released, whose sensitivity
``sens_r <= sens_n``: the run's event so far is ``GaussianDpEvent(z sens_n / sens_r)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import dp_accounting
import numpy as np
from dp_accounting import DpEvent

from fedsim.aggregation.base import Aggregator, Partial, clip_measurements, l2_clipped
from fedsim.config import DPConfig, SimConfig
from fedsim.errors import ConfigError
from fedsim.privacy import matrix_factorization as mf
from fedsim.privacy import noise
from fedsim.privacy.mechanisms.base import Mechanism


def default_cache_dir() -> str:
    """Where strategies are kept when ``dp.strategy_cache`` is null."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "fedsim" / "strategies")


def participation(cfg: SimConfig, rounds: Optional[int] = None) -> mf.Participation:
    """The participation scheme of ``cfg.sampling`` over ``rounds`` (default all)."""
    from fedsim.cohort.sampling import rounds_per_epoch

    n = int(rounds if rounds is not None else cfg.rounds)
    if cfg.sampling.scheme == "min_sep":
        return mf.Participation("min_sep", n, min_sep=int(cfg.sampling.min_sep or 1))
    if cfg.sampling.scheme == "epochs":
        return mf.Participation("epochs", n, epoch_rounds=rounds_per_epoch(
            cfg.clients, cfg.clients_per_round))
    raise ConfigError("sampling", "epochs or min_sep with a matrix-factorization mechanism",
                      cfg.sampling.scheme)


class NoiseGenerator:
    """A strategy's noise rows ``w_t = (C^{-1} Z)_t``, one round at a time, from
    what the server keeps of the past: the last ``bands - 1`` rows (banded) or
    the BLT buffers (:func:`fedsim.privacy.matrix_factorization.banded_noise_step`,
    :func:`~fedsim.privacy.matrix_factorization.blt_noise_step`)."""

    def __init__(self, strategy: mf.Strategy) -> None:
        self.strategy = strategy
        self.blt = strategy.theta is not None
        inverse = mf.toeplitz_inverse_coeffs(np.asarray(strategy.coeffs), strategy.n)
        self._row_norms = np.sqrt(np.cumsum(np.square(inverse)))

    def empty(self, dim: int) -> np.ndarray:
        if self.blt:
            assert self.strategy.theta is not None
            return mf.blt_noise_init(len(self.strategy.theta), dim)
        return np.zeros((max(len(self.strategy.coeffs) - 1, 0), dim), np.float64)

    def step(self, held: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta, omega = self.strategy.theta, self.strategy.omega
        if theta is not None and omega is not None:
            return mf.blt_noise_step(held, z, theta, omega)
        return mf.banded_noise_step(held, z, self.strategy.coeffs)

    def row_norm(self, t: int) -> float:
        """``||row t of C^{-1}||``: round t's noise std per unit std of ``Z``."""
        return float(self._row_norms[t])


class MatrixFactorizationMechanism(Mechanism):
    """What ``banded_mf`` and ``blt`` share: the strategy, its accounting and the
    aggregator; a subclass says how its strategy is found (:meth:`strategy`)."""

    correlated = True
    participation = ("epochs", "min_sep")
    fixed_rounds = True  # the strategy is optimized for exactly ``rounds`` rounds

    def strategy(self, cfg: SimConfig) -> mf.Strategy:
        raise NotImplementedError

    def check(self, cfg: SimConfig) -> None:
        super().check(cfg)
        option = f"dp.mechanism={self.name}"
        if cfg.rounds > 20000:
            raise ConfigError("rounds", f"at most 20000 with {option} (the strategy is "
                              "optimized over all rounds)", cfg.rounds)

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        return dp_accounting.GaussianDpEvent(dp.noise_multiplier)

    def run_event(self, cfg: SimConfig, rounds: int, dp: Optional[DPConfig] = None) -> DpEvent:
        dp = dp or cfg.dp
        if rounds <= 0:
            return dp_accounting.NoOpDpEvent()
        s = self.strategy(cfg)
        if dp.noise_multiplier == 0:
            return dp_accounting.GaussianDpEvent(0.0)
        sens_r = mf.toeplitz_sensitivity(s.coeffs[:rounds], participation(cfg, rounds))
        return dp_accounting.GaussianDpEvent(dp.noise_multiplier * s.sensitivity / sens_r)

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        return MatrixNoiseAggregator(cfg.dp, cfg.clients_per_round, self.strategy(cfg))


class MatrixNoiseAggregator(Aggregator):
    """Clip each update to L2 norm ``dp.l2_norm_clip`` (C, zeroing first as TFF),
    sum, add the round's correlated noise row (std of ``Z``: ``z C sens``; drawn
    once per round from the round's stream) and divide by ``clients_per_round``.

    State (fixed structure, sized by the first release): ``noise`` (the
    strategy's noise-generator state: the last bands-1 rows, or the BLT buffers)
    and ``released``.
    """

    sums_records = True

    def __init__(self, dp: DPConfig, clients_per_round: int, strategy: mf.Strategy) -> None:
        self.dp, self.strategy = dp, strategy
        self.noise = NoiseGenerator(strategy)
        self.clients_per_round = int(clients_per_round)
        self.std = dp.noise_multiplier * dp.l2_norm_clip * strategy.sensitivity

    def initial_state(self) -> dict[str, Any]:
        return {"noise": self.noise.empty(0), "released": np.int64(0)}

    def current_clip(self, state: Mapping[str, Any]) -> float:
        return float(self.dp.l2_norm_clip)

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"clip": float(self.dp.l2_norm_clip)}

    def zero_stats(self) -> dict[str, float]:
        return {"clipped": 0.0, "zeroed": 0.0}

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        clip = float(params["clip"])
        clipped, norm, zeroed = l2_clipped(delta, clip, self.dp.zeroing_norm)
        return Partial(clipped, 1.0, 1,
                       {"clipped": float(norm > clip), "zeroed": float(zeroed)})

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        dim = int(partial.total.size)
        t = int(state["released"])
        if t >= self.strategy.n:
            raise RuntimeError(f"the strategy covers {self.strategy.n} rounds; round {t + 1} "
                               "has none")
        held = state["noise"]
        if np.shape(held)[-1] != dim:
            held = self.noise.empty(dim)
        w, held = self.noise.step(held, noise.gaussian(rng, dim, self.std))
        result = ((partial.total + w) / float(self.clients_per_round)).astype(np.float32)
        # the std of the noise on this round's average (it varies with t)
        std = self.std * self.noise.row_norm(t) / self.clients_per_round
        measurements = clip_measurements(partial, float(self.dp.l2_norm_clip), std,
                                         dp_accounting.GaussianDpEvent(
                                             self.dp.noise_multiplier))
        return result, {"noise": held, "released": np.int64(t + 1)}, measurements

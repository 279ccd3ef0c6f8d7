"""Empirical privacy estimation with canary clients, after Andrew et al., "One-shot
Empirical Privacy Estimation for Federated Learning" (ICLR 2024).

``audit.kind=canary`` adds ``k`` canary clients to the run. Canary ``i`` owns a
fixed random unit direction ``u_i`` in the model's parameter space (drawn from
stream ``(seed, AUDIT, 0, i)``) and, like a real client, takes part in a round
with probability ``q = clients_per_round / clients`` (stream ``(seed, AUDIT,
round)``). When it takes part its update is ``canary_norm * u_i``, fed to the
aggregator's own ``accumulate`` (so it is clipped, counted and noised exactly
like a client's update); the server adds it to the round's sum after the
workers' (or the unmasked secure) sum.

At the end the audit compares the cosines between the model's total update
``w_0 - w_T`` (updates are pseudo-gradients, ``w <- w - lr * update``) and the
canaries' directions with the cosines to ``null_directions`` fresh random
directions that never took part (the null).
Modelling both as Gaussians, the canaries' shift in units of the null's
standard deviation, ``mu = (mean(cos_canary) - mean(cos_null)) / std(cos_null)``,
is the distinguishability of a ``mu``-GDP mechanism (Dong, Roth and Su 2022),
and the empirical epsilon is that mechanism's epsilon at the run's delta. It is
an estimate of what an adversary who sees only the final model can detect, not
a bound: it should sit at or below the accountant's epsilon, and it is large
when the noise is off (the audit detects the missing privacy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

from fedsim.config import AuditConfig
from fedsim.sampling import STREAM_AUDIT, stream


def random_direction(seed: int, index: int, dim: int, null: bool = False) -> np.ndarray:
    """Unit vector (float64) number ``index``: a canary's, or with ``null`` an unseen one."""
    v = stream(seed, STREAM_AUDIT, 0, int(null), index).standard_normal(dim)
    return v / np.linalg.norm(v)


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (Dong, Roth and Su 2022, Corollary 2.13)."""
    if mu <= 0:
        return 0.0
    return float(stats.norm.cdf(-epsilon / mu + mu / 2)
                 - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon at which a mu-GDP mechanism is (epsilon, delta)-DP."""
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-10))


@dataclass(frozen=True)
class CanaryAudit:
    """The canaries of one run: who takes part when, and their updates.

    seed: the run's seed. dim: model size. population, per_round: the real
    clients' population and cohort size (the canaries' participation rate is
    ``per_round / population``).
    """

    cfg: AuditConfig
    seed: int
    dim: int
    population: int
    per_round: int

    def participants(self, round_num: int) -> np.ndarray:
        """Indices of the canaries taking part in ``round_num``."""
        q = self.per_round / self.population
        return np.flatnonzero(stream(self.seed, STREAM_AUDIT, round_num).random(
            self.cfg.canaries) < q)

    def update(self, index: int, norm: float) -> np.ndarray:
        """Canary ``index``'s update: its direction scaled to L2 norm ``norm`` (float32)."""
        return (norm * random_direction(self.seed, index, self.dim)).astype(np.float32)

    def estimate(self, model_delta: np.ndarray, rounds: int, delta: float) -> dict[str, Any]:
        """Cosines of ``model_delta`` (initial minus final weights) with the canaries
        and with the null directions, and the empirical epsilon at ``delta``."""
        d = np.asarray(model_delta, np.float64)
        norm = float(np.linalg.norm(d))
        if norm == 0 or not math.isfinite(norm):
            raise ValueError("audit: the model did not move (or is not finite); no estimate")
        d = d / norm
        canary = np.array([random_direction(self.seed, i, self.dim) @ d
                           for i in range(self.cfg.canaries)])
        null = np.array([random_direction(self.seed, j, self.dim, null=True) @ d
                         for j in range(self.cfg.null_directions)])
        mu = float((canary.mean() - null.mean()) / null.std(ddof=1))
        participations = sum(len(self.participants(r)) for r in range(1, rounds + 1))
        return {"epsilon": gdp_epsilon(mu, delta), "delta": delta, "mu": mu,
                "canaries": self.cfg.canaries, "null_directions": self.cfg.null_directions,
                "canary_participations": participations,
                "cos_canary_mean": float(canary.mean()), "cos_canary_std": float(canary.std()),
                "cos_null_mean": float(null.mean()), "cos_null_std": float(null.std(ddof=1))}

"""Empirical privacy estimation with canary clients: the one-shot estimate of
Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning" (ICLR 2024, arXiv:2302.03098).

``audit.kind=canary`` adds ``k`` canary clients to the run. Canary ``i`` owns a
fixed random unit direction ``u_i`` in the model's parameter space (drawn from
stream ``(seed, AUDIT, 0, 0, i)``) and, like a real client under Poisson
sampling, takes part in each round independently with probability ``q =
clients_per_round / clients`` (stream ``(seed, AUDIT, round)``). When it takes
part its update is ``canary_norm * u_i``, fed to the aggregator's own
``accumulate`` (so it is clipped, counted and noised exactly like a client's
update); the server adds it to the round's sum after the workers' (or the
unmasked secure) sum. A canary is thus an add/remove neighbour with Poisson
participation, and its estimate belongs beside the add/remove, Poisson-sampled
accountant epsilon of the same mechanism events
(:meth:`fedsim.privacy.accounting.PrivacyAccountant.add_remove_twin`), whatever
sampling the real clients had.

At the end, with ``Delta = w_0 - w_T`` the model's total update (updates are
pseudo-gradients, ``w <- w - lr * update``) and ``d`` the model size:

1. ``c_i = cos(u_i, Delta)`` for every canary; their mean ``mu`` and sample
   standard deviation ``sigma`` (``ddof=1``) fit the canaries' cosines with
   ``N(mu, sigma^2)``.
2. The null (the cosine of a direction that never took part) is the paper's
   closed form, not fitted: the cosine of a uniformly random unit vector with
   any fixed vector, which is ``N(0, 1/d)`` to high accuracy for ``d >= 1000``.
3. ``d >= 1000`` (``method="two_gaussians"``): the empirical epsilon is the
   smallest epsilon at which ``N(0, 1/d)`` and ``N(mu, sigma^2)`` are
   (epsilon, delta)-indistinguishable in both directions, at the run's delta
   (:func:`epsilon_two_gaussians`).
   ``d < 1000`` (``method="closed_form_null_threshold"``): as the reference
   code does there, the exact null distribution (``c^2 ~ Beta(1/2, (d-1)/2)``)
   is kept, and epsilon is the best (epsilon, delta) bound of the threshold
   tests ``c >= t`` whose false-positive rate is the exact null's tail and
   false-negative rate the fitted Gaussian's CDF
   (:func:`epsilon_closed_form_null_gaussian_alt`).

The cosines with ``null_directions`` fresh random directions are computed too
and reported (their fitted mean and standard deviation beside the theoretical
``0`` and ``1/sqrt(d)``) as a check of the null model; they do not enter the
estimate.

Semantics follow the paper's reference implementation,
google-research/federated, ``one_shot_epe/empirical_privacy_estimation_lib.py``
(``epsilon_two_gaussians``, ``epsilon_closed_form_null_gaussian_alt``). The
estimate is of what an adversary who sees only the final model can detect,
not a bound: with noise it should sit at or below the add/remove accountant's
epsilon, and it is large when the noise is off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from fedsim.config import AuditConfig
from fedsim.rng import STREAM_AUDIT, stream

# The reference code's switch from the exact cosine null to N(0, 1/d).
GAUSSIAN_NULL_MIN_DIM = 1000
# Thresholds scanned by the exact-null estimate (as in the reference code).
THRESHOLDS = 10_000


def random_direction(seed: int, index: int, dim: int, null: bool = False) -> np.ndarray:
    """Unit vector (float64) number ``index``: a canary's, or with ``null`` an unseen one."""
    v = stream(seed, STREAM_AUDIT, 0, int(null), index).standard_normal(dim)
    return v / np.linalg.norm(v)


# -- epsilon between two Gaussians ---------------------------------------------------

def _log1mexp(x: float) -> float:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and far below it."""
    return math.log(-math.expm1(x)) if x > -math.log(2.0) else math.log1p(-math.exp(x))


def _log_mass_between(lo: float, hi: float) -> float:
    """``log(Phi(hi) - Phi(lo))`` for standardized ``lo <= hi``, without cancellation
    in either tail."""
    if lo >= hi:
        return -math.inf
    if lo > 0:  # upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
        lo, hi = -hi, -lo
    top = float(special.log_ndtr(hi))
    low = float(special.log_ndtr(lo))
    return top if low == -math.inf else top + _log1mexp(low - top)


def _log_mass(mean: float, std: float, lo: float, hi: float, outside: bool) -> float:
    """log Pr(Y in S), ``Y ~ N(mean, std^2)``, S = ``(lo, hi)`` or, with ``outside``,
    its complement ``(-inf, lo) u (hi, inf)``."""
    a, b = (lo - mean) / std, (hi - mean) / std
    if not outside:
        return _log_mass_between(a, b)
    return float(np.logaddexp(special.log_ndtr(a), special.log_ndtr(-b)))


def log_delta_two_gaussians(mu1: float, std1: float, mu2: float, std2: float,
                            epsilon: float) -> float:
    """log of the hockey-stick divergence ``H_{e^eps}(P1 || P2) = int max(0, p1 -
    e^eps p2)`` of ``P1 = N(mu1, std1^2)`` from ``P2 = N(mu2, std2^2)``.

    The privacy loss ``L(y) = log p1(y) / p2(y) = a y^2 + b y + c`` is a quadratic
    (linear when the variances are equal), so the set ``S = {L > eps}`` where the
    integrand is positive is an interval, its complement, a half-line or empty,
    and delta = ``P1(S) - e^eps P2(S)`` (computed in log space).
    """
    a = 0.5 * (std2 ** -2 - std1 ** -2)
    b = mu1 / std1 ** 2 - mu2 / std2 ** 2
    c = 0.5 * ((mu2 / std2) ** 2 - (mu1 / std1) ** 2) + math.log(std2) - math.log(std1)
    c_eps = c - epsilon  # S = {a y^2 + b y + c_eps > 0}
    if a == 0:
        if b == 0:  # the same distribution: L is the constant c = 0
            if c_eps <= 0:
                return -math.inf
            lp1 = lp2 = 0.0
        else:  # S is the half-line y > t (b > 0) or y < t (b < 0)
            t = -c_eps / b
            lo, hi = (t, math.inf) if b > 0 else (-math.inf, t)
            lp1 = _log_mass(mu1, std1, lo, hi, outside=False)
            lp2 = _log_mass(mu2, std2, lo, hi, outside=False)
    else:
        disc = b * b - 4 * a * c_eps
        if disc <= 0:
            # No sign change: S is empty (a < 0) or all of R but a point (a > 0,
            # impossible for eps >= 0: p1 > e^eps p2 everywhere); delta <= 0 both ways.
            return -math.inf
        # Roots without cancellation (one of them may be huge when a is tiny).
        q = -0.5 * (b + math.copysign(math.sqrt(disc), b))
        r1 = q / a
        r2 = c_eps / q
        lo, hi = min(r1, r2), max(r1, r2)
        outside = a > 0  # opens upward: L > eps outside the roots
        lp1 = _log_mass(mu1, std1, lo, hi, outside)
        lp2 = _log_mass(mu2, std2, lo, hi, outside)
    x = epsilon + lp2 - lp1
    if lp1 == -math.inf or x >= 0:
        return -math.inf
    return lp1 + _log1mexp(x)


def epsilon_two_gaussians(mu1: float, std1: float, mu2: float, std2: float,
                          delta: float) -> float:
    """The smallest epsilon >= 0 at which ``N(mu1, std1^2)`` and ``N(mu2, std2^2)``
    are (epsilon, delta)-indistinguishable in both directions:
    ``max(H_{e^eps}(P1 || P2), H_{e^eps}(P2 || P1)) <= delta``.

    Same semantics as ``epsilon_two_gaussians`` of the paper's reference code
    (google-research/federated, one_shot_epe/empirical_privacy_estimation_lib.py,
    after Steinke, arXiv:2210.00597): exact privacy-loss regions of the quadratic
    loss, both directions, root-found in log delta. Written afresh: each
    half-line's side follows the sign of the loss's slope, roots are computed
    without cancellation, and ``inf`` is returned when no finite epsilon reaches
    delta (e.g. ``delta`` below what float64 tails resolve).
    """
    for name, v in (("mu1", mu1), ("mu2", mu2), ("std1", std1), ("std2", std2)):
        if not math.isfinite(v):
            raise ValueError(f"epsilon_two_gaussians: {name} must be finite, not {v}")
    if std1 <= 0 or std2 <= 0:
        raise ValueError(f"epsilon_two_gaussians: standard deviations must be > 0 "
                         f"(got {std1}, {std2})")
    if not 0 < delta < 1:
        raise ValueError(f"epsilon_two_gaussians: delta must be in (0, 1), not {delta}")

    def log_delta(eps: float) -> float:
        return max(log_delta_two_gaussians(mu1, std1, mu2, std2, eps),
                   log_delta_two_gaussians(mu2, std2, mu1, std1, eps))

    target = math.log(delta)
    if log_delta(0.0) <= target:
        return 0.0
    lo, hi = 0.0, 1.0
    while log_delta(hi) > target:
        lo, hi = hi, 2 * hi
        if hi > 1e12:
            return math.inf
    # log delta is non-increasing in eps; clip -inf (delta exactly 0) so the root
    # finder sees finite values. The root, where log delta = log(target), is unchanged.
    floor = target - 100.0
    return float(optimize.brentq(lambda e: max(log_delta(e), floor) - target, lo, hi,
                                 xtol=1e-13, rtol=1e-13, maxiter=500))


# -- the exact null of a cosine (small models) ---------------------------------------

def cosine_null_log_sf(t: np.ndarray, dim: int) -> np.ndarray:
    """``log Pr(X >= t)`` for ``X`` the cosine between a uniformly random unit vector
    in ``R^dim`` and a fixed one (``X^2 ~ Beta(1/2, (dim-1)/2)``; exact, through the
    regularized incomplete beta function)."""
    t = np.asarray(t, np.float64)
    inside = np.clip(1.0 - t * t, 0.0, 1.0)
    upper = 0.5 * special.betainc((dim - 1) / 2, 0.5, inside)  # Pr(X >= |t|)
    sf = np.where(t >= 0, upper, 1.0 - upper)
    sf = np.where(t >= 1, 0.0, np.where(t <= -1, 1.0, sf))
    with np.errstate(divide="ignore"):
        return np.log(sf)


def cosine_null_ppf(p: float, dim: int) -> float:
    """The ``p``-quantile (``p <= 1/2``) of that cosine."""
    return -math.sqrt(1.0 - float(special.betaincinv((dim - 1) / 2, 0.5, 2 * p)))


def epsilon_closed_form_null_gaussian_alt(mu: float, std: float, dim: int,
                                          delta: float) -> float:
    """Epsilon between the closed-form cosine null and the canaries' ``N(mu, std^2)``.

    The paper's estimate, as its reference code computes it
    (google-research/federated, one_shot_epe/empirical_privacy_estimation_lib.py,
    ``epsilon_closed_form_null_gaussian_alt``): for ``dim >= 1000`` the null is
    ``N(0, 1/dim)`` and epsilon is :func:`epsilon_two_gaussians`; below, the exact
    null is kept and epsilon is the largest
    ``max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR))`` over
    10,000 thresholds ``t`` from the null's ``delta``-quantile to the Gaussian's
    ``(1 - delta)``-quantile, ``FPR = Pr_null(X >= t)``, ``FNR = Phi((t - mu) / std)``.
    The reference refuses ``mu <= 0`` in that branch; here the scan runs whenever
    that range is non-empty (0 otherwise), and the exact null's tail comes from
    the incomplete beta function, not numerical quadrature.
    """
    if dim >= GAUSSIAN_NULL_MIN_DIM:
        return epsilon_two_gaussians(0.0, dim ** -0.5, mu, std, delta)
    if dim < 2:
        raise ValueError(f"the cosine null needs dim >= 2, not {dim}")
    lb = cosine_null_ppf(delta, dim)
    ub = float(stats.norm.ppf(1 - delta, loc=mu, scale=std))
    if not ub > lb:
        return 0.0
    ts = np.linspace(lb, ub, THRESHOLDS)
    log_fpr = cosine_null_log_sf(ts, dim)
    fnr = stats.norm.cdf(ts, loc=mu, scale=std)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound1 = np.log(1 - delta - fnr) - log_fpr
        bound2 = np.log(1 - delta - np.exp(log_fpr)) - np.log(fnr)
    best = np.nanmax(np.concatenate([bound1, bound2]))
    return float(max(best, 0.0))


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
        """The paper's empirical epsilon at ``delta`` for ``model_delta`` (initial minus
        final weights), with the statistics it rests on (see the module docstring)."""
        d = np.asarray(model_delta, np.float64)
        norm = float(np.linalg.norm(d))
        if norm == 0 or not math.isfinite(norm):
            raise ValueError("audit: the model did not move (or is not finite); no estimate")
        d = d / norm
        canary = np.array([random_direction(self.seed, i, self.dim) @ d
                           for i in range(self.cfg.canaries)])
        null = np.array([random_direction(self.seed, j, self.dim, null=True) @ d
                         for j in range(self.cfg.null_directions)])
        mu, sigma = float(canary.mean()), float(canary.std(ddof=1))
        gaussian_null = self.dim >= GAUSSIAN_NULL_MIN_DIM
        participations = sum(len(self.participants(r)) for r in range(1, rounds + 1))
        return {"epsilon": epsilon_closed_form_null_gaussian_alt(mu, sigma, self.dim, delta),
                "delta": delta,
                "method": "two_gaussians" if gaussian_null else "closed_form_null_threshold",
                "null_model": (f"N(0, 1/d), d={self.dim}" if gaussian_null else
                               f"exact cosine null of d={self.dim} (cos^2 ~ Beta(1/2, (d-1)/2))"),
                "dimension": self.dim,
                "canaries": self.cfg.canaries, "null_directions": self.cfg.null_directions,
                "canary_participations": participations,
                "cos_canary_mean": mu, "cos_canary_std": sigma,
                "cos_null_mean_theoretical": 0.0,
                "cos_null_std_theoretical": self.dim ** -0.5,
                "cos_null_mean": float(null.mean()), "cos_null_std": float(null.std(ddof=1))}

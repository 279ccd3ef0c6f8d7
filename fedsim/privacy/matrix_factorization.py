"""Correlated-noise DP for federated learning: matrix factorization (DP-FTRL, BandMF, BLT).

Rounds are ``t = 0..n-1``; round ``t``'s input ``x_t`` is the clipped sum of the
clients' updates. The workload is the prefix-sum matrix ``A`` (lower-triangular
ones), i.e. server SGD. A mechanism factorizes ``A = B C`` and releases
``C X + Z`` with ``Z`` iid Gaussian of std ``noise_multiplier * clip * sens(C)``;
equivalently the server adds the noise row ``w_t = (C^{-1} Z)_t`` to ``x_t``.

``sens(C)`` under a participation scheme is the max over allowed participation
patterns ``S`` of ``||sum_{t in S} C[:, t]||_2``, valid when ``C^T C`` is
elementwise non-negative (Choquette-Choo et al., "Multi-epoch matrix
factorization", ICML 2023; "(Amplified) Banded Matrix Factorization", NeurIPS
2023). Every Toeplitz matrix here is lower-triangular and described by its first
column ``coeffs``.

Losses are the expected total squared error of the ``n`` prefix sums, per
coordinate, in units of ``(noise_multiplier * clip)^2``:
``loss = sens(C)^2 * ||A C^{-1}||_F^2``; a :class:`Strategy`'s ``error`` is
``sqrt(loss / n)``, the RMSE of one prefix sum per unit noise multiplier and clip.

Pure numpy/scipy, float64.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import optimize, signal

_KINDS = ("min_sep", "epochs", "once")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Participation:
    """A client's allowed participation patterns over ``n`` rounds.

    - ``kind="min_sep"``: at most once every ``min_sep`` rounds (consecutive
      participations at least ``min_sep`` rounds apart), any number of times;
    - ``kind="epochs"``: at most once in each block ``[m E, (m+1) E)`` of
      ``E = epoch_rounds`` rounds;
    - ``kind="once"``: at most one participation in total.
    """

    kind: str
    n: int
    min_sep: int = 1
    epoch_rounds: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"participation kind must be one of {_KINDS}, got {self.kind!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.min_sep < 1:
            raise ValueError(f"min_sep must be >= 1, got {self.min_sep}")
        if self.kind == "epochs" and (self.epoch_rounds is None or self.epoch_rounds < 1):
            raise ValueError("kind='epochs' needs epoch_rounds >= 1")


@dataclass(frozen=True, eq=False)
class Strategy:
    """An optimized lower-triangular Toeplitz encoder ``C``.

    ``coeffs``: first column of ``C`` (length ``n`` for BLT, ``bands`` for BandMF;
    read-only); ``sensitivity``: ``sens(C)`` under ``participation``;
    ``error``: ``sqrt(loss / n)``, the RMSE of a prefix sum per unit
    ``noise_multiplier * clip``; ``loss``: ``sens^2 * ||A C^{-1}||_F^2``.
    BLT strategies also carry ``theta`` and ``omega`` of the noise generator
    ``C^{-1}`` (see :func:`blt_inverse_coeffs`).
    """

    kind: str
    coeffs: np.ndarray
    n: int
    participation: Participation
    sensitivity: float
    error: float
    theta: np.ndarray | None = None
    omega: np.ndarray | None = None

    @property
    def loss(self) -> float:
        return self.error**2 * self.n


# ----------------------------------------------------------------------------- matrices


def prefix_workload(n: int) -> np.ndarray:
    """The prefix-sum workload ``A``: ``n x n`` lower-triangular ones."""
    return np.tril(np.ones((n, n), dtype=np.float64))


def toeplitz(coeffs: np.ndarray, n: int) -> np.ndarray:
    """The ``n x n`` lower-triangular Toeplitz matrix with first column ``coeffs``
    (zero-padded or truncated to ``n``): ``T[i, j] = coeffs[i - j]`` for ``i >= j``."""
    c = _pad(coeffs, n)
    idx = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.where(idx >= 0, c[np.clip(idx, 0, n - 1)], 0.0)


def toeplitz_inverse_coeffs(coeffs: np.ndarray, n: int) -> np.ndarray:
    """First column (length ``n``) of the inverse of ``toeplitz(coeffs, n)``.

    By the recursion ``e_0 = 1 / c_0``, ``e_k = -(sum_{j=1}^{k} c_j e_{k-j}) / c_0``
    (run by ``scipy.signal.lfilter`` as the impulse response of ``1 / c(z)``).
    ``c_0`` must be > 0.
    """
    c = np.asarray(coeffs, dtype=np.float64)[:n]
    if c.size == 0 or not c[0] > 0:
        raise ValueError("toeplitz_inverse_coeffs needs c_0 > 0")
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return np.asarray(signal.lfilter([1.0], c, impulse), dtype=np.float64)


def tree_encoder(n: int) -> np.ndarray:
    """Binary-tree aggregation's encoder: one row per dyadic interval (tree node)
    of the leaves ``0..N-1`` (``N`` = ``n`` rounded up to a power of 2) that meets
    ``[0, n)``, with 1 where the node covers the round; columns sliced to ``n``."""
    size = 1 << max(0, (n - 1).bit_length())
    rows = []
    width = 1
    while width <= size:
        for start in range(0, n, width):
            row = np.zeros(n)
            row[start:start + width] = 1.0
            rows.append(row)
        width *= 2
    return np.array(rows, dtype=np.float64)


def _pad(coeffs: np.ndarray, n: int) -> np.ndarray:
    c = np.zeros(n, dtype=np.float64)
    a = np.asarray(coeffs, dtype=np.float64).ravel()[:n]
    c[:a.size] = a
    return c


# ----------------------------------------------------------------------------- sensitivity


def _patterns(p: Participation, n: int):
    """The earliest round allowed after a participation at ``last``."""
    def nxt(last: int) -> int:
        if p.kind == "min_sep":
            return last + p.min_sep
        if p.kind == "epochs":
            e = int(p.epoch_rounds or 1)
            return (last // e + 1) * e
        return n  # once
    return nxt


def explicit_sensitivity(C: np.ndarray, participation: Participation) -> float:
    """Brute-force ``sens(C)``: the max over every allowed pattern ``S`` (of
    ``participation`` over ``C``'s ``n`` columns) of ``sqrt(1_S^T C^T C 1_S)``.

    The oracle for small tests: raises ValueError when ``C^T C`` has a negative
    entry (the column-sum formula is then not the sensitivity) or ``n > 20``.
    """
    C = np.asarray(C, dtype=np.float64)
    n = C.shape[1]
    if n > 20:
        raise ValueError(f"explicit_sensitivity enumerates patterns; n={n} > 20")
    G = C.T @ C
    if np.any(G < 0):
        raise ValueError("C^T C has a negative entry")
    nxt = _patterns(participation, n)
    best = 0.0

    def dfs(start: int, val: float, rowsum: np.ndarray) -> None:
        nonlocal best
        for t in range(start, n):
            v = val + 2.0 * rowsum[t] + G[t, t]
            if v > best:
                best = v
            dfs(nxt(t), v, rowsum + G[t])

    dfs(0, 0.0, np.zeros(n))
    return math.sqrt(best)


def _check_nonincreasing(c: np.ndarray, tol: float = 0.0) -> None:
    if c.size == 0 or not c[0] > 0:
        raise ValueError("Toeplitz coefficients need c_0 > 0")
    if np.any(c < -tol) or np.any(np.diff(c) > tol):
        raise ValueError("Toeplitz coefficients must be non-negative and non-increasing")


def _toeplitz_sens_sq(c: np.ndarray, participation: Participation) -> float:
    """``sens^2`` without the coefficient check (see :func:`toeplitz_sensitivity`)."""
    n = participation.n
    c = _pad(c, n)
    if participation.kind == "once":
        return float(np.dot(c, c))
    if participation.kind == "min_sep":
        step = participation.min_sep
    else:
        step = int(participation.epoch_rounds or 1)
    k = -(-n // step)  # ceil(n / step)
    maxpos = np.arange(k) * step  # lower bound of s_j
    total = 0.0
    for q in range(k):
        if participation.kind == "min_sep" or q == 0:
            lag = q * step
        else:
            lag = (q - 1) * step + 1
        if lag >= n:
            break
        # P[m] = sum_{l=0}^{m} c_l c_{l+lag}
        prods = np.cumsum(c[: n - lag] * c[lag:])
        idx = n - 1 - maxpos[q:]
        idx = idx[idx >= 0]
        idx = np.minimum(idx, n - lag - 1)
        s = float(prods[idx].sum())
        total += s if q == 0 else 2.0 * s
    return total


def toeplitz_sensitivity(coeffs: np.ndarray, participation: Participation) -> float:
    """``sens(C)`` of ``C = toeplitz(coeffs, participation.n)`` for non-negative,
    non-increasing ``c_0 >= c_1 >= ... >= 0`` (ValueError otherwise).

    ``min_sep = b`` (exact): the worst pattern is ``{0, b, 2b, ...}`` with
    ``k = ceil(n / b)`` participations. Proof: ``G = C^T C`` has
    ``G_ij = sum_{l=0}^{n-1-max(i,j)} c_l c_{l+|i-j|}``, which is non-increasing
    in ``max(i, j)`` (fewer non-negative terms) and in ``|i-j|`` (each term
    ``c_l c_{l+d}`` shrinks with ``d`` since ``c`` is non-increasing). A valid
    pattern ``s_0 < s_1 < ...`` has ``s_m >= m b`` and ``s_j - s_i >= (j-i) b``,
    so each term ``G_{s_i s_j}`` is at most ``G_{ib, jb}``; and adding
    participations only adds non-negative terms, so ``k`` participations at
    ``0, b, 2b, ...`` maximize ``1_S^T G 1_S``.

    ``epochs = E`` (an upper bound, exact for ``E = 1``): the same monotonicity
    with ``s_m >= m E`` and ``s_j - s_i >= (j-i-1) E + 1`` for ``j > i``, summed
    over ``ceil(n / E)`` participations.

    ``once`` (exact): the largest column norm, that of column 0, ``||c||_2``.

    Cost ``O(n k)`` vectorized: for each lag, prefix sums of the lag products.
    """
    c = np.asarray(coeffs, dtype=np.float64).ravel()[: participation.n]
    _check_nonincreasing(c)
    return math.sqrt(_toeplitz_sens_sq(c, participation))


# ----------------------------------------------------------------------------- losses


def _inverse_frob_sq(inv_coeffs: np.ndarray, n: int) -> float:
    """``||A C^{-1}||_F^2`` from the first column of ``C^{-1}``."""
    d = np.cumsum(_pad(inv_coeffs, n))
    return float(np.dot(np.arange(n, 0, -1, dtype=np.float64), d * d))


def toeplitz_loss(coeffs: np.ndarray, participation: Participation) -> float:
    """``sens(C)^2 * ||A C^{-1}||_F^2`` for ``C = toeplitz(coeffs, n)``: the total
    squared error of the ``n`` prefix sums per unit ``noise_multiplier * clip``."""
    n = participation.n
    sens = toeplitz_sensitivity(coeffs, participation)
    return sens**2 * _inverse_frob_sq(toeplitz_inverse_coeffs(_pad(coeffs, n), n), n)


def sqrt_prefix_coeffs(n: int) -> np.ndarray:
    """Coefficients of ``A^{1/2}`` (Fichtenberger-Henzinger): ``binom(2k, k) / 4^k``,
    by ``c_k = c_{k-1} (2k - 1) / (2k)``; positive and non-increasing."""
    k = np.arange(1, n, dtype=np.float64)
    return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


# ----------------------------------------------------------------------------- caching


def _disk_cached(kind: str, params: dict, cache_dir: str | None,
                 compute: Callable[[], Strategy], participation: Participation) -> Strategy:
    path = None
    if cache_dir is not None:
        key = json.dumps({"kind": kind, "version": _CACHE_VERSION, **params}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()
        path = os.path.join(cache_dir, f"{kind}-{digest}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                theta = z["theta"] if "theta" in z else None
                omega = z["omega"] if "omega" in z else None
                return _freeze(Strategy(kind, z["coeffs"], int(z["n"]), participation,
                                        float(z["sensitivity"]), float(z["error"]),
                                        theta, omega))
    s = compute()
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        extra: dict[str, Any] = {} if s.theta is None else {"theta": s.theta, "omega": s.omega}
        # one temporary file per writer: the server and every worker may compute
        # the same strategy at once; the last rename wins, with equal contents
        tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex}.tmp.npz"
        np.savez(tmp, coeffs=s.coeffs, n=s.n, sensitivity=s.sensitivity, error=s.error,
                 **extra)
        os.replace(tmp, path)
    return s


def _freeze(s: Strategy) -> Strategy:
    for a in (s.coeffs, s.theta, s.omega):
        if a is not None:
            a.flags.writeable = False
    return s


def _part_params(p: Participation) -> dict:
    return {"p_kind": p.kind, "p_n": p.n, "min_sep": p.min_sep, "epoch_rounds": p.epoch_rounds}


# ----------------------------------------------------------------------------- BandMF


@functools.lru_cache(maxsize=64)
def banded_toeplitz_strategy(n: int, bands: int, participation: Participation,
                             cache_dir: str | None = None) -> Strategy:
    """BandMF in banded Toeplitz form (Choquette-Choo et al. 2023; McKenna 2024).

    Optimizes ``c_0..c_{bands-1}`` (``c_j = 0`` for ``j >= bands``) to minimize
    ``sens(c)^2 * ||A C^{-1}||_F^2`` with L-BFGS-B (finite-difference gradient of
    the log loss). ``c_0 = 1`` (the loss is scale-invariant) and
    ``c_j = c_{j-1} r_j`` with ``r_j`` in ``[0, 1]``, so the coefficients stay
    non-negative and non-increasing and :func:`toeplitz_sensitivity` applies.
    Starts from the square-root-of-prefix-sum coefficients truncated to
    ``bands``. ``participation.n`` must equal ``n``.

    Cached in memory (lru_cache) and, with ``cache_dir``, on disk at
    ``<cache_dir>/banded-<sha256 of the parameters>.npz``.
    """
    if participation.n != n:
        raise ValueError(f"participation.n={participation.n} != n={n}")
    if not 1 <= bands <= n:
        raise ValueError(f"bands must be in 1..n, got {bands}")

    def compute() -> Strategy:
        def coeffs_of(r: np.ndarray) -> np.ndarray:
            return np.concatenate([[1.0], np.cumprod(np.clip(r, 0.0, 1.0))])

        def objective(r: np.ndarray) -> float:
            c = coeffs_of(r)
            frob = _inverse_frob_sq(toeplitz_inverse_coeffs(c, n), n)
            return math.log(_toeplitz_sens_sq(c, participation) * frob)

        start = sqrt_prefix_coeffs(bands)
        best = start
        if bands > 1:
            r0 = start[1:] / start[:-1]
            res = optimize.minimize(objective, r0, method="L-BFGS-B",
                                    bounds=[(0.0, 1.0)] * (bands - 1))
            cand = coeffs_of(res.x)
            if np.isfinite(res.fun) and res.fun <= objective(r0):
                best = cand
        return _finish("banded", best, n, participation)

    return _disk_cached("banded", {"n": n, "bands": bands, **_part_params(participation)},
                        cache_dir, compute, participation)


def _finish(kind: str, c: np.ndarray, n: int, participation: Participation,
            theta: np.ndarray | None = None, omega: np.ndarray | None = None) -> Strategy:
    c = np.array(c, dtype=np.float64)
    loss = toeplitz_loss(c, participation)
    return _freeze(Strategy(kind, c, n, participation, toeplitz_sensitivity(c, participation),
                            math.sqrt(loss / n), theta, omega))


# ----------------------------------------------------------------------------- BLT


def blt_inverse_coeffs(theta: np.ndarray, omega: np.ndarray, n: int) -> np.ndarray:
    """First column of the BLT noise generator ``C^{-1}`` (length ``n``):
    ``c'_0 = 1``, ``c'_k = -sum_i omega_i theta_i^{k-1}`` for ``k >= 1``."""
    theta = np.asarray(theta, dtype=np.float64)
    omega = np.asarray(omega, dtype=np.float64)
    k = np.arange(n - 1, dtype=np.float64)
    out = np.empty(n)
    out[0] = 1.0
    if n > 1:
        out[1:] = -(omega[None, :] * theta[None, :] ** k[:, None]).sum(axis=1)
    return out


def _blt_coeffs(theta: np.ndarray, omega: np.ndarray, n: int) -> np.ndarray:
    """``C``'s coefficients from the rational form ``C(z) = D(z) / N(z)`` with
    ``D = prod_i (1 - theta_i z)``, ``N = D - z sum_i omega_i prod_{j != i} (1 - theta_j z)``
    (equal to ``toeplitz_inverse_coeffs(blt_inverse_coeffs(...), n)``, in ``O(n buffers)``)."""
    D = np.array([1.0])
    for t in theta:
        D = np.convolve(D, [1.0, -t])
    N = np.concatenate([D, [0.0]])
    for i, w in enumerate(omega):
        P = np.array([1.0])
        for j, t in enumerate(theta):
            if j != i:
                P = np.convolve(P, [1.0, -t])
        N[1:1 + P.size] -= w * P
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return np.asarray(signal.lfilter(D, N, impulse), dtype=np.float64)


@functools.lru_cache(maxsize=64)
def blt_strategy(n: int, buffers: int, participation: Participation,
                 cache_dir: str | None = None) -> Strategy:
    """BLT (buffered linear Toeplitz; Dvijotham et al. FOCS 2024, McKenna 2024).

    The noise generator ``C^{-1}`` is BLT with ``buffers`` pairs
    ``(theta_i, omega_i)``, ``theta_i`` in (0, 1), ``omega_i > 0``
    (:func:`blt_inverse_coeffs`); ``C``'s coefficients are its Toeplitz inverse.
    Minimizes the same loss as :func:`banded_toeplitz_strategy` (L-BFGS-B on
    ``theta = sigmoid(u)``, ``omega = exp(v)``, log loss, finite differences), with
    a penalty when ``C``'s coefficients are not non-negative non-increasing; the
    result is checked by :func:`toeplitz_sensitivity`. Initialized by a
    non-negative least-squares fit of ``omega`` (``theta`` on a fixed grid) to the
    square-root-of-prefix-sum generator ``(1 - z)^{1/2}``. ``coeffs`` is ``C``'s
    first column (length ``n``). Cached like the banded strategy (``blt-<sha256>.npz``).
    """
    if participation.n != n:
        raise ValueError(f"participation.n={participation.n} != n={n}")
    if buffers < 1:
        raise ValueError("buffers must be >= 1")

    def compute() -> Strategy:
        # init: fit -c'_k of (1 - z)^{1/2}: c'_k = -binom(2k, k) / (4^k (2k - 1))
        kk = np.arange(1, n, dtype=np.float64)
        target = sqrt_prefix_coeffs(n)[1:] / (2 * kk - 1)
        theta0 = 1.0 - np.logspace(-0.3, -math.log10(max(n, 2)), buffers)
        M = theta0[None, :] ** (kk - 1)[:, None]
        omega0, _ = optimize.nnls(M, target)
        omega0 = np.maximum(omega0, 1e-8)
        total = float(np.sum(omega0 / (1 - theta0)))
        if total >= 1.0:
            omega0 = omega0 * 0.99 / total

        def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            th = 1.0 / (1.0 + np.exp(-x[:buffers]))
            return th, np.exp(x[buffers:])

        def objective(x: np.ndarray) -> float:
            th, om = unpack(x)
            c = _blt_coeffs(th, om, n)
            if not np.all(np.isfinite(c)) or c[0] <= 0:
                return 1e6
            viol = float(np.sum(np.maximum(-c, 0)) + np.sum(np.maximum(np.diff(c), 0)))
            frob = _inverse_frob_sq(blt_inverse_coeffs(th, om, n), n)
            sens_sq = _toeplitz_sens_sq(np.maximum(c, 0), participation)
            return math.log(sens_sq * frob) + 1e3 * viol

        x0 = np.concatenate([np.log(theta0 / (1 - theta0)), np.log(omega0)])
        res = optimize.minimize(objective, x0, method="L-BFGS-B")
        candidates = [res.x, x0] if res.fun <= objective(x0) else [x0]
        for x in candidates:
            th, om = unpack(x)
            c = _blt_coeffs(th, om, n)
            try:
                _check_nonincreasing(c)
            except ValueError:
                continue
            return _finish("blt", c, n, participation, th, om)
        raise ValueError("BLT optimization found no valid (non-increasing) strategy")

    return _disk_cached("blt", {"n": n, "buffers": buffers, **_part_params(participation)},
                        cache_dir, compute, participation)


# ----------------------------------------------------------------------------- streaming noise


def blt_noise_init(buffers: int, dim: int) -> np.ndarray:
    """The BLT noise generator's state before round 0: ``buffers x dim`` zeros."""
    return np.zeros((buffers, dim), dtype=np.float64)


def blt_noise_step(state: np.ndarray, z: np.ndarray, theta: np.ndarray,
                   omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One round of BLT noise: ``w_t = (C^{-1} Z)_t`` in ``O(buffers x dim)`` memory.

    With ``s_{i,0} = 0`` and ``s_{i,t} = theta_i s_{i,t-1} + z_{t-1}``,
    ``w_t = z_t - sum_i omega_i s_{i,t}`` (the convention of
    :func:`blt_inverse_coeffs`). ``state`` holds ``s_t``; returns ``(w_t, s_{t+1})``.
    ``z`` is the round's iid Gaussian row (in whatever units the caller scales).
    """
    z = np.asarray(z, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    omega = np.asarray(omega, dtype=np.float64)
    w = z - omega @ state
    new_state = theta[:, None] * state + z[None, :]
    return w, new_state


def banded_noise_step(history: np.ndarray, z: np.ndarray,
                      coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One round of BandMF noise: ``w_t = (z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0``,
    i.e. ``W = C^{-1} Z`` solved forward.

    ``history`` is ``(b-1) x dim`` with row ``j-1`` holding ``w_{t-j}`` (zeros
    before round 0); returns ``(w_t, new_history)``.
    """
    c = np.asarray(coeffs, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    b = c.size
    w = z.copy()
    if b > 1:
        w -= c[1:] @ history
    w /= c[0]
    if b > 1:
        history = np.concatenate([w[None, :], history[:-1]], axis=0)
    return w, history


__all__ = [
    "Participation", "Strategy", "prefix_workload", "toeplitz", "toeplitz_inverse_coeffs",
    "tree_encoder", "explicit_sensitivity", "toeplitz_sensitivity", "toeplitz_loss",
    "sqrt_prefix_coeffs", "banded_toeplitz_strategy", "blt_strategy", "blt_inverse_coeffs",
    "blt_noise_init", "blt_noise_step", "banded_noise_step",
]

"""Exact samplers of the discrete Gaussian and the discrete Laplace on the integers.

Under secure aggregation the server holds an integer sum (fixed-point units,
:mod:`fedsim.secure.fixedpoint`). Adding integer noise drawn *exactly* from the
discrete Gaussian ``N_Z(0, sigma^2)``,

    P(x) = exp(-x^2 / (2 sigma^2)) / sum_{y in Z} exp(-y^2 / (2 sigma^2)),   x in Z,

gives a release whose privacy is exactly that of Canonne, Kamath and Steinke,
"The Discrete Gaussian for Differential Privacy" (NeurIPS 2020, "CKS20"):
``1/2 (Delta / sigma)^2``-concentrated DP for an integer sum of L2 sensitivity
``Delta``, both ``Delta`` and ``sigma`` in the units of that integer sum. No
floating-point value takes part in the release, so Mironov's (CCS 2012)
floating-point caveat does not apply to it, and there is no cut-off of the
tails: every integer has its exact, positive probability.

What "exact" means here
-----------------------
Given ideal uniform integers, the output distribution is exactly the one above
(and ``P(x) = exp(-|x| / scale) / normalizer`` for :func:`discrete_laplace`),
not an approximation of it. Every random decision is one of

- a uniform integer from ``Generator.integers(0, m, dtype=np.int64)`` with
  ``m <= 2^63 - 1`` (numpy draws bounded integers by rejection, so they are
  exactly uniform given a uniform bit stream), or from ``Generator.bytes``
  turned into a Python int, with rejection, for larger ``m``;
- hence an exact Bernoulli(a / b) of a rational (``U < a`` for ``U`` uniform in
  ``[0, b)``), and from those an exact Bernoulli(exp(-gamma)) of a rational
  ``gamma >= 0`` (CKS20 Algorithm 1: ``K`` = the first ``k >= 1`` at which a
  Bernoulli(gamma / k) fails is odd with probability ``exp(-gamma)`` for
  ``gamma`` in ``[0, 1]``; ``exp(-gamma)`` for larger ``gamma`` is the
  conjunction of ``floor(gamma)`` independent Bernoulli(exp(-1)) and one
  Bernoulli(exp(-frac(gamma))));
- the discrete Laplace of rational scale ``p / q`` by CKS20 Algorithm 2 as in
  their reference code: ``U`` uniform in ``[0, p)`` kept with probability
  ``exp(-U / p)``, ``V`` the number of Bernoulli(exp(-1)) successes before a
  failure, magnitude ``(V p + U) // q``, a uniform sign, and ``(-, 0)``
  rejected;
- the discrete Gaussian by CKS20 Algorithm 3: a discrete Laplace candidate
  ``Y`` of integer scale ``t = floor(sigma) + 1`` is kept with probability
  ``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``.

No floating-point number is computed, and no comparison of floats decides a
sample. The only randomness consumed is the ``Generator``'s, so the same
generator state gives the same samples (the algorithm itself is fixed: a change
to it changes which samples a seed gives, not their distribution).

Big numbers
-----------
``sigma^2 = n / d`` is taken as an exact rational (an ``int`` or a
``fractions.Fraction``; a ``float`` is refused because its exact value is a
binary fraction that the caller should choose to mean, with
``Fraction(x)``). The acceptance exponent of Algorithm 3 is
``gamma = (|Y| d t - n)^2 / (2 n d t^2)``, whose numerator and denominator
exceed 64 bits already at moderate ``sigma`` (about ``2^170`` and ``2^161`` at
``sigma = 2^40``). It is computed with Python integers (numpy object arrays),
once per candidate, as ``G = floor(gamma * 2^62)``: ``floor(gamma) = G >> 62``
and the next 62 binary digits of ``frac(gamma)`` (an int64). A Bernoulli of
``frac(gamma) / k`` is then the conjunction of an exact Bernoulli(1 / k) and an
exact Bernoulli(frac(gamma)), the latter decided by comparing a uniform 62-bit
integer with those digits; only on a tie (probability ``2^-62`` per draw) is
the exact remainder ``(N 2^62) mod D`` recomputed in Python integers and
compared with a uniform integer below ``D``. All other quantities (``U``,
``V p + U``, the candidates) fit int64 by the limits below; a magnitude that
would not fit (probability below ``exp(-8000)`` within those limits) raises
``OverflowError`` rather than being cut off.

Limits: ``0 < sigma^2 <= 2^100`` (``sigma <= 2^50``: the int64 output then
overflows only beyond ``2^13`` standard deviations); a discrete Laplace scale
``p / q`` in lowest terms with ``p, q <= 2^62``.

Vectorization: each rejection round processes all pending samples together in
numpy; only the slots whose candidate was rejected are redrawn, and each inner
loop of Algorithm 1 carries only its survivors (whose number decays like
``1 / k!``) into the next round.
"""

from __future__ import annotations

import math
import numbers
import operator
from fractions import Fraction
from typing import Callable

import numpy as np

DISCRETE_GAUSSIAN_SAMPLER = "cks20-exact-discrete-gaussian"
"""What summaries name as the sampler of :func:`discrete_gaussian` noise."""
DISCRETE_LAPLACE_SAMPLER = "cks20-exact-discrete-laplace"
"""What summaries name as the sampler of :func:`discrete_laplace` noise."""

MAX_SIGMA_SQUARED = 2**100
"""The largest ``sigma^2`` accepted (int64 outputs stay far from overflow)."""
MAX_SCALE_TERM = 2**62
"""The largest numerator or denominator of a discrete Laplace scale accepted."""

_INT64_MAX = 2**63 - 1
_DIGIT_BITS = 62
_DIGIT_BASE = 1 << _DIGIT_BITS

BernoulliOf = Callable[[np.ndarray], np.ndarray]
"""``f(idx) -> bool array``: exact Bernoulli(x_i) draws for the elements ``idx``."""


# -- inputs ------------------------------------------------------------------------

def _rational(value, name: str) -> Fraction:
    """``value`` as an exact positive Fraction; floats and others refused."""
    if isinstance(value, (float, np.floating)):
        raise ValueError(
            f"{name} must be an int or fractions.Fraction, not the float {value!r}: "
            f"the sampler is exact for a rational, so pass Fraction({value!r}) (the "
            f"float's exact binary value) or e.g. Fraction('{value!r}') explicitly")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an int or fractions.Fraction, not a bool")
    if isinstance(value, numbers.Integral):
        r = Fraction(int(value))
    elif isinstance(value, Fraction):
        r = value
    else:
        raise ValueError(
            f"{name} must be an int or fractions.Fraction, not {type(value).__name__} "
            f"{value!r}")
    if r <= 0:
        raise ValueError(f"{name} must be > 0, got {r}")
    return r


def _size(size) -> int:
    try:
        m = operator.index(size)
    except TypeError:
        raise ValueError(f"size must be a non-negative int, got {size!r}") from None
    if m < 0:
        raise ValueError(f"size must be a non-negative int, got {m}")
    return m


def _generator(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


# -- exact uniforms and Bernoullis -------------------------------------------------

def _uniform_below(rng: np.random.Generator, m: int) -> int:
    """One exact uniform Python int in ``[0, m)`` for any int ``m >= 1``."""
    if m <= _INT64_MAX:
        return int(rng.integers(0, m, dtype=np.int64))
    nbits = m.bit_length()
    nbytes = (nbits + 7) // 8
    drop = 8 * nbytes - nbits
    while True:  # accepts with probability > 1/2
        x = int.from_bytes(rng.bytes(nbytes), "little") >> drop
        if x < m:
            return x


def _bernoulli_inverse(rng: np.random.Generator, k: int, m: int) -> np.ndarray:
    """``m`` exact Bernoulli(1 / k) draws, ``k >= 1``."""
    if k == 1:
        return np.ones(m, bool)
    if k <= _INT64_MAX:
        return rng.integers(0, k, size=m, dtype=np.int64) == 0
    return np.array([_uniform_below(rng, k) == 0 for _ in range(m)], bool)


def _bernoulli_exp_frac(rng: np.random.Generator, elems: np.ndarray,
                        bernoulli_x: BernoulliOf) -> np.ndarray:
    """Exact Bernoulli(exp(-x_i)) for ``x_i`` in ``[0, 1]`` (CKS20 Algorithm 1).

    ``bernoulli_x(idx)`` draws exact Bernoulli(x_i) for the elements ``idx`` (a
    subset of ``elems``). For each element, ``k = 1, 2, ...`` until a
    Bernoulli(x / k) (= Bernoulli(1 / k) and Bernoulli(x), independent) fails;
    the result is whether that ``k`` is odd. Returns a bool array aligned with
    ``elems``."""
    out = np.zeros(elems.size, bool)
    alive = np.arange(elems.size)
    k = 1
    while alive.size:
        hit = _bernoulli_inverse(rng, k, alive.size)
        pos = np.flatnonzero(hit)
        if pos.size:
            hit[pos] = bernoulli_x(elems[alive[pos]])
        if k % 2:
            out[alive[~hit]] = True
        alive = alive[hit]
        k += 1
    return out


def _bernoulli_exp_minus_one(rng: np.random.Generator, m: int) -> np.ndarray:
    """``m`` exact Bernoulli(exp(-1)) draws (Algorithm 1 with ``x = 1``)."""
    out = np.zeros(m, bool)
    alive = np.arange(m)
    k = 2  # Bernoulli(1 / 1) always succeeds
    while alive.size:
        hit = _bernoulli_inverse(rng, k, alive.size)
        if k % 2:
            out[alive[~hit]] = True
        alive = alive[hit]
        k += 1
    return out


def _bernoulli_exp_int(rng: np.random.Generator, q: np.ndarray) -> np.ndarray:
    """Exact Bernoulli(exp(-q_i)) for integers ``q_i >= 0`` (int64 or object):
    ``q_i`` independent Bernoulli(exp(-1)), all of which must succeed."""
    out = np.ones(q.size, bool)
    idx = np.flatnonzero(q > 0)
    left = q[idx]
    while idx.size:
        coin = _bernoulli_exp_minus_one(rng, idx.size)
        out[idx[~coin]] = False
        more = coin & (left > 1)
        idx, left = idx[more], left[more] - 1
    return out


def _geometric_exp_minus_one(rng: np.random.Generator, m: int) -> np.ndarray:
    """``m`` exact counts of Bernoulli(exp(-1)) successes before the first
    failure: ``P(V = v) = (1 - e^-1) e^-v`` (int64)."""
    v = np.zeros(m, np.int64)
    idx = np.arange(m)
    while idx.size:
        idx = idx[_bernoulli_exp_minus_one(rng, idx.size)]
        v[idx] += 1
    return v


def _bernoulli_digits(rng: np.random.Generator, digits: np.ndarray,
                      tail: Callable[[int], bool], idx: np.ndarray) -> np.ndarray:
    """Exact Bernoulli(p_i) for ``p_i = (digits_i + rho_i) / 2^62``, ``digits_i``
    in ``[0, 2^62)`` (int64) and ``rho_i`` in ``[0, 1)``.

    A uniform 62-bit ``u`` decides ``u < digits_i`` (success) or ``u > digits_i``
    (failure); on a tie the answer is an exact Bernoulli(rho_i), ``tail(idx_i)``
    (``U < p`` for a uniform real ``U = (u + U') / 2^62``)."""
    u = rng.integers(0, _DIGIT_BASE, size=digits.size, dtype=np.int64)
    out = u < digits
    for j in np.flatnonzero(u == digits):
        out[j] = tail(int(idx[j]))
    return out


# -- CKS20 Algorithms 2 and 3 ------------------------------------------------------

def _magnitudes(v: np.ndarray, u: np.ndarray, p: int, q: int) -> np.ndarray:
    """``(v p + u) // q`` in int64, without overflow in the product."""
    vmax = (_INT64_MAX - (p - 1)) // p
    if v.size == 0 or int(v.max()) <= vmax:
        return (v * p + u) // q
    mag = np.empty(v.size, np.int64)
    small = v <= vmax
    mag[small] = (v[small] * p + u[small]) // q
    for j in np.flatnonzero(~small):
        m = (int(v[j]) * p + int(u[j])) // q
        if m > _INT64_MAX:
            raise OverflowError(f"a discrete Laplace magnitude {m} does not fit int64")
        mag[j] = m
    return mag


def _laplace_candidates(rng: np.random.Generator, m: int, p: int,
                        q: int) -> tuple[np.ndarray, np.ndarray]:
    """``m`` trials of CKS20 Algorithm 2 for scale ``p / q`` (lowest terms).

    Returns ``(pos, y)``: the trials (indices in ``[0, m)``) that produced a
    sample and their samples (int64). Each trial fails when ``U`` is rejected
    or the pair (negative sign, magnitude 0) comes up; the samples of the
    successful trials are i.i.d. discrete Laplace, independent of which
    trials failed."""
    if p == 1:
        pos = np.arange(m)
        u = np.zeros(m, np.int64)
    else:
        u_all = rng.integers(0, p, size=m, dtype=np.int64)
        kept = _bernoulli_exp_frac(  # Bernoulli(exp(-U / p))
            rng, np.arange(m),
            lambda idx: rng.integers(0, p, size=idx.size, dtype=np.int64) < u_all[idx])
        pos = np.flatnonzero(kept)
        u = u_all[pos]
    mag = _magnitudes(_geometric_exp_minus_one(rng, pos.size), u, p, q)
    negative = rng.integers(0, 2, size=pos.size, dtype=np.int64) == 1
    ok = ~(negative & (mag == 0))
    y = np.where(negative, -mag, mag)
    return pos[ok], y[ok]


def _bias_tail(rng: np.random.Generator, a: int, n: int, dt: int, den: int) -> bool:
    """Exact Bernoulli(rho) for the part of ``gamma * 2^62`` below its integer
    digits, ``rho = ((a dt - n)^2 2^62 mod den) / den`` (on a digit tie only)."""
    rem = ((a * dt - n) ** 2 << _DIGIT_BITS) % den
    return _uniform_below(rng, den) < rem


def _accept_bias(rng: np.random.Generator, a: np.ndarray, n: int, dt: int,
                 den: int) -> np.ndarray:
    """Exact Bernoulli(exp(-gamma_i)), ``gamma_i = (a_i dt - n)^2 / den``, for
    int64 ``a_i >= 0`` (Python-int arithmetic: these numbers exceed int64)."""
    x = a.astype(object) * dt - n
    g = ((x * x) << _DIGIT_BITS) // den  # floor(gamma * 2^62)
    whole = g >> _DIGIT_BITS
    digits = (g & (_DIGIT_BASE - 1)).astype(np.int64)
    if whole.size and whole.max() <= _INT64_MAX:
        whole = whole.astype(np.int64)
    accept = _bernoulli_exp_int(rng, whole)

    def tail(i: int) -> bool:
        return _bias_tail(rng, int(a[i]), n, dt, den)

    sel = np.flatnonzero(accept)
    accept[sel] = _bernoulli_exp_frac(
        rng, sel, lambda idx: _bernoulli_digits(rng, digits[idx], tail, idx))
    return accept


# -- public samplers ---------------------------------------------------------------

def discrete_laplace(rng: np.random.Generator, size: int,
                     scale: int | Fraction) -> np.ndarray:
    """``size`` i.i.d. exact samples (int64) of the discrete Laplace of scale
    ``scale``: ``P(x) = exp(-|x| / scale) (1 - e^(-1/scale)) / (1 + e^(-1/scale))``
    over the integers.

    ``scale > 0`` is an ``int`` or a ``Fraction`` ``p / q`` (lowest terms) with
    ``p, q <= 2^62``; a float raises ValueError. CKS20 Algorithm 2 as in their
    reference code (rational scale); the variance is
    ``2 e^(-1/scale) / (1 - e^(-1/scale))^2``."""
    rng = _generator(rng)
    m = _size(size)
    s = _rational(scale, "scale")
    p, q = s.numerator, s.denominator
    if p > MAX_SCALE_TERM or q > MAX_SCALE_TERM:
        raise ValueError(f"scale {s} has a numerator or denominator above 2^62")
    out = np.empty(m, np.int64)
    pending = np.arange(m)
    while pending.size:
        pos, y = _laplace_candidates(rng, pending.size, p, q)
        out[pending[pos]] = y
        pending = np.delete(pending, pos)
    return out


def discrete_gaussian(rng: np.random.Generator, size: int,
                      sigma_squared: Fraction | int) -> np.ndarray:
    """``size`` i.i.d. exact samples (int64) of the discrete Gaussian
    ``N_Z(0, sigma^2)``: ``P(x)`` proportional to ``exp(-x^2 / (2 sigma^2))``
    over the integers (CKS20 Algorithm 3).

    ``sigma_squared`` (``sigma^2``, in the squared units of the integers the
    noise is added to) is an ``int`` or a ``fractions.Fraction`` with
    ``0 < sigma^2 <= 2^100``; a float raises ValueError (pass ``Fraction(x)``
    explicitly). The distribution's variance is strictly below ``sigma^2`` (CKS20), by
    a relative amount that vanishes exponentially fast in ``sigma^2``. The same
    ``rng`` state gives the same samples."""
    rng = _generator(rng)
    m = _size(size)
    s2 = _rational(sigma_squared, "sigma_squared")
    if s2 > MAX_SIGMA_SQUARED:
        raise ValueError(f"sigma_squared must be <= 2^100, got {s2}")
    n, d = s2.numerator, s2.denominator
    t = math.isqrt(n // d) + 1  # floor(sigma) + 1
    dt, den = d * t, 2 * n * d * t * t  # gamma = (|Y| d t - n)^2 / (2 n d t^2)
    out = np.empty(m, np.int64)
    pending = np.arange(m)
    while pending.size:
        pos, y = _laplace_candidates(rng, pending.size, t, 1)
        keep = _accept_bias(rng, np.abs(y), n, dt, den)
        done = pos[keep]
        out[pending[done]] = y[keep]
        pending = np.delete(pending, done)
    return out

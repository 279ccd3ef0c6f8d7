"""The exact discrete Gaussian and discrete Laplace samplers (pure numpy, fixed
seeds): their pmfs, moments and tails against the exact distributions computed
here independently (mpmath, 50 digits), large sigma without overflow, the digit
tie path on a crafted bit stream, and input validation."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest

from fedsim.privacy import discrete_noise as dn

mpmath.mp.dps = 50
M64 = 2**64
P_MIN = 1e-4  # chi-square p-value below which a test fails


# -- exact reference distributions -------------------------------------------------

@functools.lru_cache(maxsize=None)
def gauss_pmf(s2: Fraction) -> dict[int, mpmath.mpf]:
    """P(x) = exp(-x^2 / (2 s2)) / Z over |x| <= 40 sigma + 10 (the rest: < e^-800)."""
    s2m = mpmath.mpf(s2.numerator) / s2.denominator
    half = math.isqrt(math.ceil(s2)) + 1
    w = {x: mpmath.exp(-mpmath.mpf(x * x) / (2 * s2m)) for x in range(-40 * half - 10, 40 * half + 11)}
    z = mpmath.fsum(w.values())
    return {x: v / z for x, v in w.items()}


@functools.lru_cache(maxsize=None)
def laplace_pmf(scale: Fraction) -> dict[int, mpmath.mpf]:
    """P(x) = exp(-|x| / scale) / Z over |x| <= 80 scale + 20 (the rest: < e^-80)."""
    sm = mpmath.mpf(scale.numerator) / scale.denominator
    top = 80 * math.ceil(scale) + 20
    w = {x: mpmath.exp(-abs(x) / sm) for x in range(-top, top + 1)}
    z = mpmath.fsum(w.values())
    return {x: v / z for x, v in w.items()}


def moments(pmf: dict[int, mpmath.mpf]) -> tuple[float, float, float]:
    """(mean, variance, fourth central moment) of an exact pmf."""
    mean = mpmath.fsum(x * p for x, p in pmf.items())
    var = mpmath.fsum((x - mean) ** 2 * p for x, p in pmf.items())
    m4 = mpmath.fsum((x - mean) ** 4 * p for x, p in pmf.items())
    return float(mean), float(var), float(m4)


def tail_probability(pmf: dict[int, mpmath.mpf], k: int) -> float:
    return float(mpmath.fsum(p for x, p in pmf.items() if abs(x) >= k))


def chi_square_pvalue(samples: np.ndarray, pmf: dict[int, mpmath.mpf]) -> float:
    """Pearson's chi-square of the counts against the pmf: one bin per value
    expected at least 5 times, the two tails pooled (and merged into their
    neighbour when still expected fewer than 5 times)."""
    n = samples.size
    central = sorted(x for x, p in pmf.items() if n * p >= 5)
    lo, hi = central[0], central[-1]
    values, counts = np.unique(samples, return_counts=True)
    obs = dict(zip(values.tolist(), counts.tolist()))
    bins = [[n * float(pmf[x]), obs.get(x, 0)] for x in central]
    left = [n * float(mpmath.fsum(p for x, p in pmf.items() if x < lo)),
            int(counts[values < lo].sum())]
    right = [n * float(mpmath.fsum(p for x, p in pmf.items() if x > hi)),
             int(counts[values > hi].sum())]
    for tail, at in ((left, 0), (right, -1)):
        if tail[0] >= 5:
            bins.insert(0 if at == 0 else len(bins), tail)
        else:
            bins[at][0] += tail[0]
            bins[at][1] += tail[1]
    chi2 = sum((o - e) ** 2 / e for e, o in bins)
    return float(mpmath.gammainc((len(bins) - 1) / 2, chi2 / 2, mpmath.inf, regularized=True))


def assert_binomial(count: int, n: int, p: float) -> None:
    """``count`` successes of ``n`` within 5 standard deviations of ``n p``."""
    assert abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (count, n * p)


# -- samples (each drawn once per session) -----------------------------------------

GAUSS_S2 = [Fraction(1, 4), Fraction(2), Fraction(9, 2), Fraction(100)]
LAPLACE_SCALES = [Fraction(1, 3), Fraction(1), Fraction(7, 3), Fraction(10)]
N = 200_000


@functools.lru_cache(maxsize=None)
def gauss_samples(s2: Fraction, n: int = N, seed: int = 0) -> np.ndarray:
    return dn.discrete_gaussian(np.random.default_rng([seed, s2.numerator, s2.denominator]), n, s2)


@functools.lru_cache(maxsize=None)
def laplace_samples(scale: Fraction, n: int = N) -> np.ndarray:
    return dn.discrete_laplace(np.random.default_rng([1, scale.numerator, scale.denominator]), n, scale)


# -- the discrete Gaussian ---------------------------------------------------------

@pytest.mark.parametrize("s2", GAUSS_S2, ids=str)
def test_discrete_gaussian_pmf_chi_square(s2):
    x = gauss_samples(s2)
    assert x.dtype == np.int64 and x.shape == (N,)
    assert chi_square_pvalue(x, gauss_pmf(s2)) > P_MIN


@pytest.mark.parametrize("s2", GAUSS_S2, ids=str)
def test_discrete_gaussian_is_symmetric(s2):
    x = gauss_samples(s2)
    pos, neg = int((x > 0).sum()), int((x < 0).sum())
    assert abs(pos - neg) <= 5 * math.sqrt(pos + neg)
    # value by value: c(v) - c(-v) given c(v) + c(-v) is binomial(1/2)
    values, counts = np.unique(np.abs(x[x != 0]), return_counts=True)
    plus = np.array([(x == v).sum() for v in values])
    z = (2 * plus - counts) / np.sqrt(counts)
    big = counts >= 20
    chi2 = float((z[big] ** 2).sum())
    assert mpmath.gammainc(int(big.sum()) / 2, chi2 / 2, mpmath.inf, regularized=True) > P_MIN


@pytest.mark.parametrize("s2", GAUSS_S2, ids=str)
def test_discrete_gaussian_mean_and_variance_are_the_exact_ones(s2):
    mean, var, m4 = moments(gauss_pmf(s2))
    assert mean == 0 and var <= s2  # the discrete Gaussian's variance is below sigma^2
    x = gauss_samples(s2).astype(np.float64)
    assert abs(x.mean()) <= 5 * math.sqrt(var / N)
    # E[x^2] estimates the variance (the mean is exactly 0); its std: sqrt((m4 - var^2) / N)
    assert abs(np.mean(x * x) - var) <= 5 * math.sqrt((m4 - var * var) / N)


def test_small_sigma_variance_is_visibly_below_sigma_squared():
    """At sigma = 1/2 the exact variance is 0.861 sigma^2; the samples see it."""
    s2 = Fraction(1, 4)
    _, var, m4 = moments(gauss_pmf(s2))
    assert 0.85 < var / float(s2) < 0.87
    x = gauss_samples(s2).astype(np.float64)
    assert float(s2) - np.mean(x * x) > 10 * math.sqrt((m4 - var * var) / N)


def test_discrete_gaussian_tails_have_their_exact_frequency():
    """No cut-off: 4 standard deviations out, the counts match the exact tail
    mass (at sigma = 1 with 500,000 draws, and at sigma = 1/2)."""
    s2 = Fraction(1)
    n = 500_000
    x = gauss_samples(s2, n, seed=7)
    assert_binomial(int((np.abs(x) >= 4).sum()), n, tail_probability(gauss_pmf(s2), 4))
    assert_binomial(int((np.abs(x) >= 3).sum()), n, tail_probability(gauss_pmf(s2), 3))
    half = gauss_samples(Fraction(1, 4))
    assert_binomial(int((np.abs(half) >= 2).sum()), N, tail_probability(gauss_pmf(Fraction(1, 4)), 2))


@pytest.mark.parametrize("s2, a", [(Fraction(1), 4), (Fraction(2**80), None)], ids=["sigma1", "sigma2^40"])
def test_far_candidates_are_accepted_with_probability_exp_minus_gamma(s2, a):
    """Algorithm 3's acceptance of a candidate far out (gamma above 4: the
    integer part's Bernoulli(exp(-1)) chain and the digits of the fraction) is
    exp(-gamma), for small numbers and for numbers far beyond int64."""
    n, d = s2.numerator, s2.denominator
    t = math.isqrt(n // d) + 1
    a = 4 * t if a is None else a
    dt, den = d * t, 2 * n * d * t * t
    gamma = Fraction((a * dt - n) ** 2, den)
    assert gamma > 4
    p = float(mpmath.exp(-mpmath.mpf(gamma.numerator) / gamma.denominator))
    trials = 400_000
    acc = dn._accept_bias(np.random.default_rng(3), np.full(trials, a, np.int64), n, dt, den)
    assert_binomial(int(acc.sum()), trials, p)


def test_large_sigma_two_to_the_forty_without_overflow():
    s2 = 2**80
    sigma = 2.0**40
    n = 100_000
    x = dn.discrete_gaussian(np.random.default_rng(5), n, s2)
    assert x.dtype == np.int64
    assert np.abs(x).max() < 8 * sigma  # no wrap-around (P(|x| > 8 sigma) ~ 1e-15)
    z = x.astype(np.float64) / sigma
    assert abs(z.mean()) <= 5 / math.sqrt(n)
    assert abs(np.mean(z**2) - 1) <= 5 * math.sqrt(2 / n)
    assert abs(np.mean(z**4) - 3) <= 5 * math.sqrt(96 / n)
    # the low bits are uniform (the distribution mod 16 is, to within e^-10^20)
    low = np.bincount(x % 16, minlength=16)
    chi2 = float(((low - n / 16) ** 2 / (n / 16)).sum())
    assert mpmath.gammainc(15 / 2, chi2 / 2, mpmath.inf, regularized=True) > P_MIN


@pytest.mark.parametrize("s2", [Fraction(3**50, 7), Fraction(10**30 + 1, 10**28), Fraction(2**100)],
                         ids=["3^50/7", "100+1e-28", "2^100"])
def test_rational_and_largest_sigma_squared_moments(s2):
    """Numerator and denominator both far from powers of two or both huge."""
    n = 50_000
    x = dn.discrete_gaussian(np.random.default_rng(6), n, s2)
    z = x.astype(np.float64) / math.sqrt(s2)
    assert abs(z.mean()) <= 5 / math.sqrt(n)
    assert abs(np.mean(z**2) - 1) <= 5 * math.sqrt(2 / n)


def test_tiny_sigma_gives_zeros_through_the_big_integer_path():
    """sigma^2 = 1e-30: the exponent of +-1 is 5e29 (beyond int64), so 0 only."""
    x = dn.discrete_gaussian(np.random.default_rng(2), 20_000, Fraction(1, 10**30))
    assert x.dtype == np.int64 and not x.any()


def test_same_generator_state_gives_the_same_samples():
    a = dn.discrete_gaussian(np.random.default_rng(42), 1000, Fraction(9, 2))
    b = dn.discrete_gaussian(np.random.default_rng(42), 1000, Fraction(9, 2))
    c = dn.discrete_gaussian(np.random.default_rng(43), 1000, Fraction(9, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(dn.discrete_laplace(np.random.default_rng(1), 500, 3),
                          dn.discrete_laplace(np.random.default_rng(1), 500, 3))
    assert dn.discrete_gaussian(np.random.default_rng(0), 0, 2).shape == (0,)
    assert dn.DISCRETE_GAUSSIAN_SAMPLER == "cks20-exact-discrete-gaussian"


# -- the digit tie, on a crafted bit stream ----------------------------------------

def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) % M64


def sfc64_emitting(o1: int, o2: int, b: int) -> np.random.SFC64:
    """An SFC64 bit generator whose first two 64-bit outputs are o1 and o2 (as
    in test_noise.py: a0 = o1 - b0, 9 c0 = o2 - 1 - (b0 ^ (b0 >> 11)), w0 = 0)."""
    a = (o1 - b) % M64
    c = (o2 - 1 - (b ^ (b >> 11))) * pow(9, -1, M64) % M64
    bg = np.random.SFC64()
    st = bg.state
    st["state"]["state"] = np.array([a, b, c, 0], dtype=np.uint64)
    bg.state = st
    return bg


@pytest.mark.parametrize("s2", [Fraction(9, 2), Fraction(2**80 + 1, 3)], ids=["den324", "den>2^64"])
def test_a_digit_tie_is_resolved_by_the_exact_remainder(s2):
    """``integers(0, 2^62)`` returns the top 62 bits of the first 64-bit word, so
    a crafted first word makes the uniform equal the digits of frac(gamma)
    (probability 2^-62 otherwise): the answer is then Bernoulli(rho) of the
    exact remainder; one above or below the digits decides it outright."""
    n, d = s2.numerator, s2.denominator
    t = math.isqrt(n // d) + 1
    dt, den = d * t, 2 * n * d * t * t
    for a in range(t, 50 * t):  # a candidate whose remainder is far from 0 and 1
        g, rem = divmod((a * dt - n) ** 2 << 62, den)
        digits = g % 2**62
        if 0.3 < rem / den < 0.7 and 0 < digits < 2**62 - 1:
            break
    else:
        pytest.fail("no candidate with a remainder in (0.3, 0.7)")
    rho = rem / den

    def draw(u: int, b: int) -> bool:
        rng = np.random.Generator(sfc64_emitting((u << 2) | (b & 3), b >> 2, b))
        return bool(dn._bernoulli_digits(
            rng, np.array([digits], np.int64),
            lambda i: dn._bias_tail(rng, a, n, dt, den), np.array([0]))[0])

    words = np.random.default_rng(9).integers(0, M64, size=3000, dtype=np.uint64).tolist()
    assert all(draw(digits - 1, b) for b in words[:20])
    assert not any(draw(digits + 1, b) for b in words[:20])
    hits = sum(draw(digits, b) for b in words)
    assert_binomial(hits, len(words), rho)


# -- the discrete Laplace ----------------------------------------------------------

@pytest.mark.parametrize("scale", LAPLACE_SCALES, ids=str)
def test_discrete_laplace_pmf_chi_square(scale):
    x = laplace_samples(scale)
    assert x.dtype == np.int64 and x.shape == (N,)
    assert chi_square_pvalue(x, laplace_pmf(scale)) > P_MIN


@pytest.mark.parametrize("scale", LAPLACE_SCALES, ids=str)
def test_discrete_laplace_mean_and_variance_are_the_exact_ones(scale):
    mean, var, m4 = moments(laplace_pmf(scale))
    e = math.exp(-1 / scale)
    assert mean == 0 and var == pytest.approx(2 * e / (1 - e) ** 2, rel=1e-12)
    x = laplace_samples(scale).astype(np.float64)
    assert abs(x.mean()) <= 5 * math.sqrt(var / N)
    assert abs(np.mean(x * x) - var) <= 5 * math.sqrt((m4 - var * var) / N)


def test_discrete_laplace_tail_and_large_scale():
    scale = Fraction(1)
    n = 1_000_000
    x = dn.discrete_laplace(np.random.default_rng(8), n, scale)
    assert_binomial(int((np.abs(x) >= 10).sum()), n, tail_probability(laplace_pmf(scale), 10))
    big = dn.discrete_laplace(np.random.default_rng(8), 100_000, 2**40)
    z = big.astype(np.float64) / 2.0**40  # variance 2 scale^2 (1 + O(scale^-2))
    assert abs(np.mean(z * z) - 2) <= 5 * math.sqrt(20 / 100_000)  # Var(z^2) = 24 - 4


# -- input validation --------------------------------------------------------------

def test_float_sigma_squared_is_refused_with_a_one_line_message():
    rng = np.random.default_rng(0)
    for bad in (2.0, np.float64(0.5)):
        with pytest.raises(ValueError, match=r"not the float .*pass Fraction\(") as err:
            dn.discrete_gaussian(rng, 3, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="float"):
        dn.discrete_laplace(rng, 3, 1.5)


@pytest.mark.parametrize("bad", [0, -1, Fraction(-1, 2), Fraction(0)])
def test_non_positive_parameters_are_refused(bad):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="must be > 0"):
        dn.discrete_gaussian(rng, 3, bad)
    with pytest.raises(ValueError, match="must be > 0"):
        dn.discrete_laplace(rng, 3, bad)


def test_other_bad_inputs_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="bool"):
        dn.discrete_gaussian(rng, 3, True)
    with pytest.raises(ValueError, match="Decimal"):
        from decimal import Decimal
        dn.discrete_gaussian(rng, 3, Decimal(2))
    with pytest.raises(ValueError, match="2\\^100"):
        dn.discrete_gaussian(rng, 3, 2**100 + 1)
    with pytest.raises(ValueError, match="2\\^62"):
        dn.discrete_laplace(rng, 3, Fraction(1, 2**63))
    with pytest.raises(ValueError, match="size"):
        dn.discrete_gaussian(rng, -1, 2)
    with pytest.raises(TypeError, match="Generator"):
        dn.discrete_gaussian(np.random.RandomState(0), 3, 2)
    assert dn.discrete_gaussian(rng, np.int64(4), np.int64(3)).shape == (4,)

"""The canary audit (Andrew et al., ICLR 2024): the paper's estimator against
numbers computed independently of it (numerical hockey-stick integrals, the
closed-form Gaussian mechanism, the reference code's own regression values), and
whole runs where it must stay below the add/remove accountant it estimates."""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from helpers import small_config
from scipy import integrate, special

from fedsim.config import AuditConfig, DPConfig, ModelConfig, ServerConfig
from fedsim.privacy.audit import (
    CanaryAudit,
    cosine_null_log_sf,
    epsilon_closed_form_null_gaussian_alt,
    epsilon_two_gaussians,
    random_direction,
)
from fedsim.simulation import run_simulation


def hockey_stick(mu_p, std_p, mu_q, std_q, eps):
    """int max(0, p - e^eps q) dy by adaptive quadrature over +-40 std (no use of
    where the privacy loss crosses eps: the integrand's kinks are left to quad)."""
    def logpdf(y, mu, std):
        return -0.5 * ((y - mu) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))

    def f(y):
        lp, lq = logpdf(y, mu_p, std_p), logpdf(y, mu_q, std_q) + eps
        return math.exp(lp) - math.exp(lq) if lp > lq else 0.0

    s = max(std_p, std_q)
    lo, hi = min(mu_p, mu_q) - 40 * s, max(mu_p, mu_q) + 40 * s
    pieces = np.linspace(lo, hi, 201)  # short pieces: each kink is local to one
    return sum(integrate.quad(f, a, b, epsabs=1e-16, epsrel=1e-10, limit=200)[0]
               for a, b in zip(pieces[:-1], pieces[1:]))


def both_ways(mu0, std0, mu1, std1, eps):
    return max(hockey_stick(mu0, std0, mu1, std1, eps), hockey_stick(mu1, std1, mu0, std0, eps))


@pytest.mark.parametrize("mu0,std0,mu1,std1,delta", [
    (0.0, 1.0, 1.0, 1.2, 1e-5),   # the canaries' spread above the null's
    (0.0, 1.0, 0.5, 0.8, 1e-3),   # ... and below it
    (0.0, 1.0, 0.0, 1.3, 1e-5),   # no shift at all: the variances alone leak
    (2.0, 0.5, -1.0, 3.0, 1e-2),  # arbitrary means, far-apart variances
    (0.0, 0.02, 0.03, 0.021, 1e-5),  # cosine scale: N(0, 1/d) against a fitted canary
])
def test_two_gaussians_epsilon_is_where_the_hockey_stick_reaches_delta(mu0, std0, mu1, std1,
                                                                        delta):
    eps = epsilon_two_gaussians(mu0, std0, mu1, std1, delta)
    assert eps > 0
    assert both_ways(mu0, std0, mu1, std1, eps) == pytest.approx(delta, rel=1e-5)
    assert both_ways(mu0, std0, mu1, std1, 0.99 * eps) > delta * (1 + 1e-4)
    # Symmetric in the pair; invariant to a common affine change of units.
    assert epsilon_two_gaussians(mu1, std1, mu0, std0, delta) == pytest.approx(eps, rel=1e-9)
    assert epsilon_two_gaussians(3 + 2 * mu0, 2 * std0, 3 + 2 * mu1, 2 * std1, delta) == \
        pytest.approx(eps, rel=1e-9)


def gaussian_mechanism_log_delta(mu, eps):
    """log delta(eps) of the Gaussian mechanism of sensitivity/sigma = mu (Balle and
    Wang 2018; Dong, Roth and Su 2022): Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    a = special.log_ndtr(-eps / mu + mu / 2)
    b = special.log_ndtr(-eps / mu - mu / 2) + eps
    return a + math.log(-math.expm1(b - a))


@pytest.mark.parametrize("shift", [0.3, 1.0, 3.0, 10.0, 40.0])
@pytest.mark.parametrize("delta", [1e-10, 1e-5, 0.1])
def test_equal_variances_give_the_gaussian_mechanisms_epsilon(shift, delta):
    sigma = 0.7
    for d_std in (0.0, -1e-12, 1e-12):  # the exact linear case and the quadratic's
        for mu0, mu1 in ((0.0, shift * sigma), (shift * sigma, 0.0)):
            eps = epsilon_two_gaussians(mu0, sigma, mu1, sigma + d_std, delta)
            assert gaussian_mechanism_log_delta(shift, eps) == pytest.approx(
                math.log(delta), abs=1e-6), (mu0, mu1, d_std)


def test_two_gaussians_edges():
    assert epsilon_two_gaussians(0.0, 1.0, 0.0, 1.0, 1e-5) == 0.0  # the same distribution
    assert epsilon_two_gaussians(0.0, 1.0, 1e-3, 1.0, 0.5) == 0.0  # delta above TV distance
    with pytest.raises(ValueError):
        epsilon_two_gaussians(0.0, 0.0, 1.0, 1.0, 1e-5)
    with pytest.raises(ValueError):
        epsilon_two_gaussians(0.0, 1.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("dim,expected", [(200, 2.375326), (2000, 2.317789)])
def test_matches_the_reference_implementations_regression_values(dim, expected):
    # google-research/federated one_shot_epe/empirical_privacy_estimation_test.py,
    # test_closed_form_null_gaussian_alt_regression: mu = std = dim**-0.5, delta 1e-2
    # (dim 200: the exact cosine null and its threshold scan; 2000: N(0, 1/d)).
    got = epsilon_closed_form_null_gaussian_alt(dim ** -0.5, dim ** -0.5, dim, 1e-2)
    assert got == pytest.approx(expected, rel=1e-6)


def test_exact_cosine_null_tail():
    dim = 50
    norm = math.exp(special.gammaln(dim / 2) - special.gammaln((dim - 1) / 2)) / math.sqrt(math.pi)
    for t in (-0.5, -0.1, 0.0, 0.2, 0.6):
        tail = integrate.quad(lambda x: norm * (1 - x * x) ** ((dim - 3) / 2), t, 1,
                              epsabs=1e-15, epsrel=1e-12)[0]
        assert math.exp(cosine_null_log_sf(t, dim)) == pytest.approx(tail, rel=1e-9)


def test_null_directions_are_unit_and_uncorrelated():
    dim = 5000
    v = np.stack([random_direction(7, i, dim, null=True) for i in range(200)])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    cos = v[1:] @ v[0]
    # Cosines of independent random directions: mean 0, std 1/sqrt(dim).
    assert abs(cos.mean()) < 5 / math.sqrt(dim * 199)
    assert 0.8 < cos.std() * math.sqrt(dim) < 1.2
    assert not np.allclose(random_direction(7, 0, dim), v[0])  # canaries differ from the null


def test_estimate_fits_the_canaries_mean_and_spread_against_the_n01d_null():
    # A model delta in which canary i shows with weight 1.5 k_i, k_i ~ Binomial(6, 0.3)
    # (their participations), over noise: the canaries' cosines spread wider than the
    # null's, by sqrt(1 + var(w)) / sqrt(1 + sum(w^2) / d) = 1.65 in expectation
    # (the std of 200 cosines is estimated to about 5%).
    dim, k, delta = 5000, 200, 1e-5
    audit = CanaryAudit(AuditConfig(kind="canary", canaries=k, null_directions=300),
                        seed=3, dim=dim, population=100, per_round=30)
    rng = np.random.default_rng(0)
    weights = rng.binomial(6, 0.3, k) * 1.5
    model_delta = rng.standard_normal(dim) + sum(
        w * random_direction(3, i, dim) for i, w in enumerate(weights))
    out = audit.estimate(model_delta, rounds=6, delta=delta)

    unit = model_delta / np.linalg.norm(model_delta)
    cos = np.array([random_direction(3, i, dim) @ unit for i in range(k)])
    assert out["method"] == "two_gaussians"
    assert out["cos_canary_mean"] == pytest.approx(cos.mean(), rel=1e-12)
    assert out["cos_canary_std"] == pytest.approx(cos.std(ddof=1), rel=1e-12)
    assert out["cos_null_std_theoretical"] == dim ** -0.5
    assert out["cos_null_std"] == pytest.approx(dim ** -0.5, rel=0.15)  # the check on the null
    assert out["cos_canary_std"] > 1.2 * dim ** -0.5
    # The paper's epsilon: N(0, 1/d) against N(mean, std^2) at delta, both directions,
    # checked by direct integration, not by the code under test.
    eps = out["epsilon"]
    assert both_ways(0.0, dim ** -0.5, cos.mean(), cos.std(ddof=1), eps) == pytest.approx(
        delta, rel=1e-5)
    # Here the canaries' spread matters: a fit of the mean shift alone (mu-GDP,
    # mu = mean / null std) would be far off.
    mu = cos.mean() * math.sqrt(dim)
    gdp_eps = epsilon_two_gaussians(0.0, 1.0, mu, 1.0, delta)
    assert eps > gdp_eps + 1.0, (eps, gdp_eps)


def test_small_models_use_the_exact_cosine_null():
    dim = 300
    audit = CanaryAudit(AuditConfig(kind="canary", canaries=50, null_directions=50),
                        seed=1, dim=dim, population=10, per_round=5)
    rng = np.random.default_rng(1)
    model_delta = rng.standard_normal(dim) + sum(random_direction(1, i, dim) for i in range(50))
    out = audit.estimate(model_delta, rounds=1, delta=1e-3)
    assert out["method"] == "closed_form_null_threshold"
    assert out["epsilon"] == epsilon_closed_form_null_gaussian_alt(
        out["cos_canary_mean"], out["cos_canary_std"], dim, 1e-3)
    assert out["epsilon"] > 0


def _audited(noise: float, canaries: int):
    return small_config(
        clients=40, clients_per_round=10, rounds=12, model=ModelConfig(name="mlp", hidden=[32]),
        dp=DPConfig(mechanism="gaussian", noise_multiplier=noise, l2_norm_clip=0.5, delta=1e-5),
        server=ServerConfig(weighting="uniform"),
        audit=AuditConfig(kind="canary", canaries=canaries))


def test_audit_stays_below_the_accountant_with_noise_and_detects_no_noise(warm_actors, tmp_path):
    # With noise: 1,000 canaries, so that their fitted spread (to which the estimate
    # at delta 1e-5 is sensitive) is a few percent off at most, not ~10% as with 50.
    noisy = run_simulation(_audited(1.0, canaries=1000), tmp_path / "noisy", actors=warm_actors)
    audit = json.loads((tmp_path / "noisy" / "summary.json").read_text())["audit"]
    assert audit == pytest.approx(noisy.summary["audit"])
    assert audit["method"] == "two_gaussians" and audit["canary_participations"] > 0
    # Canaries join as add/remove neighbours with probability q = 10/40 each round:
    # the audit's accountant is that one, not the run's replace-one (uniform) epsilon.
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    direct.compose(dp_accounting.PoissonSampledDpEvent(10 / 40, dp_accounting.GaussianDpEvent(1.0)),
                   12)
    eps_add_remove = audit["accountant_epsilon_add_remove"]
    assert eps_add_remove == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert audit["accountant_delta_add_remove"] == audit["delta"] == 1e-5
    assert "add/remove" in audit["compared_with"]
    assert noisy.summary["privacy"]["neighboring_relation"] == "REPLACE_ONE"
    assert eps_add_remove < noisy.summary["privacy"]["epsilon"]
    assert 0 <= audit["epsilon"] <= eps_add_remove, audit

    # Without noise (50 canaries: a thousand would crowd one another out of the
    # model's 2,410 dimensions) the canaries stand far out of the null.
    bare = run_simulation(_audited(0.0, canaries=50), actors=warm_actors).summary
    assert bare["privacy"]["epsilon"] == "inf"
    assert bare["audit"]["accountant_epsilon_add_remove"] == "inf"
    assert bare["audit"]["cos_canary_mean"] > 4 * bare["audit"]["cos_null_std_theoretical"]
    assert bare["audit"]["epsilon"] > 10, bare["audit"]
    assert bare["audit"]["epsilon"] > 3 * audit["epsilon"]

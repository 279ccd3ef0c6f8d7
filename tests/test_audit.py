"""The canary audit (Andrew et al., ICLR 2024): its GDP arithmetic against
dp-accounting, and whole runs where it must agree with the accountant."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from fedsim.audit import gdp_delta, gdp_epsilon, random_direction
from fedsim.config import AuditConfig, DPConfig, ModelConfig, ServerConfig
from fedsim.simulation import run_simulation
from helpers import small_config


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0])
def test_gdp_epsilon_is_the_gaussian_mechanisms_epsilon(mu):
    # mu-GDP is exactly the Gaussian mechanism with sensitivity 1 and sigma 1/mu,
    # whose privacy curve dp-accounting's PLD accountant computes tightly.
    acct = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acct.compose(dp_accounting.GaussianDpEvent(1.0 / mu))
    delta = 1e-5
    assert gdp_epsilon(mu, delta) == pytest.approx(acct.get_epsilon(delta), abs=2e-3)
    assert gdp_delta(mu, gdp_epsilon(mu, delta)) == pytest.approx(delta, rel=1e-6)
    assert gdp_epsilon(0.0, delta) == 0.0


def test_null_directions_are_unit_and_uncorrelated():
    dim = 5000
    v = np.stack([random_direction(7, i, dim, null=True) for i in range(200)])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    cos = v[1:] @ v[0]
    # Cosines of independent random directions: mean 0, std 1/sqrt(dim).
    assert abs(cos.mean()) < 5 / math.sqrt(dim * 199)
    assert 0.8 < cos.std() * math.sqrt(dim) < 1.2
    assert not np.allclose(random_direction(7, 0, dim), v[0])  # canaries differ from the null


def _audited(noise: float):
    return small_config(
        clients=40, clients_per_round=10, rounds=12, model=ModelConfig(name="mlp", hidden=[32]),
        dp=DPConfig(mechanism="gaussian", noise_multiplier=noise, l2_norm_clip=0.5, delta=1e-5),
        server=ServerConfig(weighting="uniform"), audit=AuditConfig(kind="canary", canaries=50))


def test_audit_stays_below_the_accountant_with_noise_and_detects_no_noise(ray_local, tmp_path):
    noisy = run_simulation(_audited(1.0), tmp_path / "noisy").summary
    eps_accountant = noisy["privacy"]["epsilon"]
    assert noisy["audit"]["canary_participations"] > 0
    assert 0 <= noisy["audit"]["epsilon"] <= eps_accountant, (noisy["audit"], eps_accountant)
    bare = run_simulation(_audited(0.0)).summary
    assert bare["privacy"]["epsilon"] == "inf"
    # Without noise the canaries stand far out of the null: the audit sees it.
    assert bare["audit"]["mu"] > 4 and bare["audit"]["epsilon"] > 10, bare["audit"]
    assert bare["audit"]["epsilon"] > 3 * noisy["audit"]["epsilon"]

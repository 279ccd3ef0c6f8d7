"""dp.noise_sampler=discrete_gaussian: exact integer noise on the secure sum,
accounted without amplification (pure parts without Ray, one simulation)."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedsim.config import (
    AuditConfig,
    DPConfig,
    ModelConfig,
    RayConfig,
    SecAggConfig,
    ServerConfig,
    SimConfig,
)
from fedsim.errors import ConfigError
from fedsim.privacy.accounting import (
    PrivacyAccountant,
    build_accountant,
    default_delta,
    mechanism_event,
)
from fedsim.privacy.discrete_gaussian import DiscreteGaussianAggregator
from fedsim.privacy.events import DiscreteGaussianDpEvent
from fedsim.secure.layout import make_layout


def _cfg(**dp) -> SimConfig:
    return SimConfig(clients=20, clients_per_round=5, rounds=2, local_epochs=1, batch_size=10,
                     model=ModelConfig(name="logreg"), ray=RayConfig(workers=1), progress=False,
                     server=ServerConfig(weighting="uniform"),
                     secagg=SecAggConfig(protocol="secagg"),
                     dp=DPConfig(mechanism="gaussian", noise_sampler="discrete_gaussian",
                                 noise_multiplier=1.5, l2_norm_clip=0.5, **dp))


def test_config_refuses_what_the_discrete_path_cannot_do():
    _cfg()
    with pytest.raises(ConfigError, match="dp.noise_sampler=discrete_gaussian: allowed is "
                                          "float64 unless dp=gaussian with secagg"):
        dataclasses.replace(_cfg(), secagg=SecAggConfig())
    with pytest.raises(ConfigError, match="dp.noise_sampler"):
        dataclasses.replace(_cfg(), dp=dataclasses.replace(_cfg().dp, mechanism="laplace"))
    with pytest.raises(ConfigError, match="dp.target_epsilon"):
        _cfg(target_epsilon=3.0)
    with pytest.raises(ConfigError, match="audit.kind"):
        dataclasses.replace(_cfg(), audit=AuditConfig(kind="canary"))
    with pytest.raises(ConfigError, match="dp.noise_sampler=exact: allowed is one of"):
        DPConfig(noise_sampler="exact")


def test_integer_noise_is_added_to_the_integer_sum_exactly():
    cfg = _cfg()
    agg = DiscreteGaussianAggregator(cfg.dp, 5)
    d = 4000
    layout = make_layout(cfg.secagg, cfg.dp.l2_norm_clip, [d], 5)
    codec = layout.codecs[0]
    rng = np.random.default_rng(0)
    vectors = [rng.normal(size=d) * 0.004 for _ in range(5)]
    total = np.zeros(d, np.uint64)
    for v in vectors:
        total = (total + layout.encode([v], rng)) & np.uint64(codec.modulus - 1)
    plain = layout.decode_sum(total, 5)[0] * codec.scale
    assert np.array_equal(plain, np.round(plain))  # an integer sum in fixed-point units
    units = agg.integer_noise(np.random.default_rng(1), d, codec.scale)
    assert units.dtype == np.int64
    noised = layout.decode_sum(total, 5, units)[0] * codec.scale
    np.testing.assert_array_equal(noised, plain + units)  # exact, in integers
    sigma = 1.5 * 0.5 * codec.scale
    assert sigma == 1.5 * 2 ** 16  # z * C * 2^precision_bits / C
    assert abs(units.std() - sigma) < 5 * sigma / math.sqrt(2 * d)
    assert abs(units.mean()) < 5 * sigma / math.sqrt(d)
    again = agg.integer_noise(np.random.default_rng(1), d, codec.scale)
    np.testing.assert_array_equal(units, again)


def test_accounted_unamplified_with_the_rounded_replace_one_sensitivity():
    cfg = _cfg()
    dim, rounds = 650, 7
    acct = build_accountant(cfg, dim)
    event = mechanism_event(cfg.dp, 5)
    assert event == DiscreteGaussianDpEvent(1.5)
    for _ in range(rounds):
        acct.record(acct.round_event(event))
    # The same RDP curve as a Gaussian of multiplier z / 2 / (1 + sqrt(d) 2^-16),
    # composed without sampling (add/remove Gaussian in dp-accounting: alpha / 2z^2).
    factor = 1 + math.sqrt(dim) / 2 ** 16
    direct = RdpAccountant()
    direct.compose(dp_accounting.GaussianDpEvent(1.5 / 2 / factor), rounds)
    assert acct.epsilon() == pytest.approx(direct.get_epsilon(default_delta(20)), rel=1e-5)
    # A Poisson-sampled Gaussian of the same multiplier claims far less: not done here.
    amplified = PrivacyAccountant("rdp", "uniform", 20, 5, default_delta(20))
    amplified.record(amplified.round_event(dp_accounting.GaussianDpEvent(1.5)))
    assert amplified.epsilon() < acct.epsilon()
    assert math.isinf(PrivacyAccountant("rdp", "uniform", 20, 5, 1e-3)._epsilon(
        [[DiscreteGaussianDpEvent(0.0), 1]]))


def test_simulation_with_discrete_noise_under_secagg(warm_actors, tmp_path):
    from fedsim.simulation import run_simulation

    res = run_simulation(_cfg(), tmp_path / "run", actors=warm_actors)
    privacy = res.summary["privacy"]
    assert privacy["noise_sampler"] == "cks20-exact-discrete-gaussian"
    assert privacy["secure_rounding_charged"] == {"model_size": 650, "precision_bits": 16}
    acct = build_accountant(_cfg(), 650)
    for r in res.metrics:
        assert r["secagg"] == "ok" and r["clients"] == 5
        assert r["noise_std"] == pytest.approx(1.5 * 0.5 / 5)
        acct.record(acct.round_event(DiscreteGaussianDpEvent(1.5)))
        assert r["epsilon"] == pytest.approx(acct.epsilon(), rel=1e-9)
    assert np.isfinite(res.weights).all()

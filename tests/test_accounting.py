"""Privacy accounting: the epsilon fedsim reports is dp-accounting's for the same
events, the TF Privacy tutorial's number is reproduced, calibration and budgets."""

from __future__ import annotations

import dataclasses

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedsim.config import DPConfig, ModelConfig, RayConfig, ServerConfig, SimConfig
from fedsim.errors import ConfigError
from fedsim.privacy.accounting import (
    PrivacyAccountant,
    audit_comparison,
    build_accountant,
    calibrate,
    default_delta,
    mechanism_event,
)

REPLACE = dp_accounting.NeighboringRelation.REPLACE_ONE


def test_tf_privacy_tutorial_epsilon():
    # 60,000 examples, batch 250, noise 1.3, 3 epochs = 720 steps, delta 1e-5: 0.563.
    acct = PrivacyAccountant("rdp", "poisson", 60_000, 250, 1e-5)
    for _ in range(720):
        acct.record(acct.round_event(dp_accounting.GaussianDpEvent(1.3)))
    assert acct.epsilon() == pytest.approx(0.563, abs=5e-4)
    assert acct.ledger[0][1] == 720


def test_events_match_dp_accounting_directly():
    z, n, m, r, delta = 0.9, 1000, 50, 25, 1e-4
    acct = PrivacyAccountant("rdp", "uniform", n, m, delta)
    for _ in range(r):
        acct.record(acct.round_event(dp_accounting.GaussianDpEvent(z)))
    direct = RdpAccountant(neighboring_relation=REPLACE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        n, m, dp_accounting.GaussianDpEvent(z / 2)), r)  # replace-one: sensitivity 2C
    assert acct.epsilon() == pytest.approx(direct.get_epsilon(delta), rel=1e-9)

    pld = PrivacyAccountant("pld", "poisson", n, m, delta)
    for _ in range(r):
        pld.record(pld.round_event(dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(1.0), dp_accounting.GaussianDpEvent(2.0)])))
    direct = PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(
        m / n, dp_accounting.GaussianDpEvent((1.0 + 0.25) ** -0.5)), r)
    assert pld.epsilon() == pytest.approx(direct.get_epsilon(delta), rel=1e-6)


def test_laplace_events_under_rdp_and_pld():
    # RDP has no subsampled Laplace: rounds compose unamplified (an upper bound).
    acct = PrivacyAccountant("rdp", "poisson", 100, 10, 1e-5)
    for _ in range(3):
        acct.record(acct.round_event(dp_accounting.LaplaceDpEvent(1 / 0.2)))
    direct = RdpAccountant()
    direct.compose(dp_accounting.LaplaceDpEvent(1 / 0.2), 3)
    assert acct.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert acct.epsilon() < 3 * 0.2 * 1.05  # close to basic composition
    # PLD amplifies by Poisson sampling: far below the unamplified bound.
    pld = PrivacyAccountant("pld", "poisson", 100, 10, 1e-5)
    for _ in range(3):
        pld.record(pld.round_event(dp_accounting.LaplaceDpEvent(1 / 0.2)))
    assert pld.epsilon() < 0.5 * acct.epsilon()


@pytest.mark.parametrize("sampling,kind", [("uniform", "rdp"), ("poisson", "rdp"),
                                           ("poisson", "pld")])
def test_noiseless_release_is_infinite_epsilon(sampling, kind):
    acct = PrivacyAccountant(kind, sampling, 100, 10, 1e-5)
    acct.record(acct.round_event(dp_accounting.GaussianDpEvent(0.0)))
    assert acct.epsilon() == float("inf")


def test_epsilon_grows_and_what_if_does_not_record():
    acct = PrivacyAccountant("rdp", "uniform", 100, 10, default_delta(100))
    ev = acct.round_event(dp_accounting.GaussianDpEvent(2.0))
    assert acct.epsilon() == 0.0
    first = acct.epsilon_after(ev)
    assert acct.ledger == []
    acct.record(ev)
    assert acct.epsilon() == pytest.approx(first)
    assert acct.epsilon_after(ev) > first


def test_add_remove_twin_is_the_poisson_accountant_of_the_same_mechanism_events():
    # What a canary (an add/remove neighbour joining each round with probability
    # m/n) is set beside, from a run whose real clients came in fixed-size cohorts.
    n, m, delta = 200, 20, 1e-5
    adaptive = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(1.1),
                                              dp_accounting.GaussianDpEvent(8.0)])
    events = [dp_accounting.GaussianDpEvent(0.9)] * 5 + [adaptive] * 3
    uniform = PrivacyAccountant("rdp", "uniform", n, m, delta)
    for ev in events:
        uniform.record(uniform.round_event(ev))
    twin = uniform.add_remove_twin()
    assert twin.relation == dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    direct = RdpAccountant()
    for ev, count in ((dp_accounting.GaussianDpEvent(0.9), 5), (adaptive, 3)):
        direct.compose(dp_accounting.PoissonSampledDpEvent(m / n, ev), count)
    assert twin.epsilon() == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    assert twin.epsilon() < uniform.epsilon()  # replace-one costs more
    # A resumed run's restored ledger gives the same twin; another cohort size, another q.
    resumed = PrivacyAccountant("rdp", "uniform", n, m, delta)
    resumed.restore([[e, c] for e, c in uniform.ledger])
    assert resumed.add_remove_twin().ledger == twin.ledger
    assert uniform.add_remove_twin(10).ledger[0][0].sampling_probability == 10 / n

    # Under Poisson sampling the twin is the run's own accountant.
    for kind in ("rdp", "pld"):
        poisson = PrivacyAccountant(kind, "poisson", n, m, delta)
        for ev in events:
            poisson.record(poisson.round_event(ev))
        assert poisson.add_remove_twin().ledger == poisson.ledger
        assert poisson.add_remove_twin().epsilon() == poisson.epsilon()

    # Laplace under RDP stays unamplified, at the add/remove sensitivity.
    lap = PrivacyAccountant("rdp", "uniform", n, m, delta)
    lap.record(lap.round_event(dp_accounting.LaplaceDpEvent(5.0)))
    assert lap.add_remove_twin().ledger == [[dp_accounting.LaplaceDpEvent(5.0), 1]]

    noiseless = PrivacyAccountant("rdp", "uniform", n, m, delta)
    noiseless.record(noiseless.round_event(dp_accounting.GaussianDpEvent(0.0)))
    assert audit_comparison(noiseless, m)["accountant_epsilon_add_remove"] == "inf"
    assert audit_comparison(None, m)["accountant_epsilon_add_remove"] is None
    out = audit_comparison(uniform, m)
    assert out["accountant_epsilon_add_remove"] == twin.epsilon()
    assert out["accountant_delta_add_remove"] == delta


def _sim(**dp):
    return SimConfig(clients=200, clients_per_round=20, rounds=30,
                     server=ServerConfig(weighting="uniform"), dp=DPConfig(**dp))


@pytest.mark.parametrize("dp", [
    dict(mechanism="gaussian", target_epsilon=4.0),
    dict(mechanism="gaussian_adaptive", target_epsilon=8.0, clipped_count_stddev=5.0),
    dict(mechanism="laplace", target_epsilon=3.0),
])
def test_target_epsilon_calibration_spends_exactly_the_target(dp):
    cfg = _sim(**dp)
    calibrated = calibrate(cfg)
    acct = PrivacyAccountant("rdp", "uniform", 200, 20, default_delta(200))
    for _ in range(cfg.rounds):
        acct.record(acct.round_event(mechanism_event(calibrated, 20)))
    assert acct.epsilon() == pytest.approx(dp["target_epsilon"], rel=1e-3)


def test_impossible_adaptive_split_is_refused_like_tff():
    with pytest.raises(ConfigError, match="too low to achieve"):
        SimConfig(clients=100, clients_per_round=10, server=ServerConfig(weighting="uniform"),
                  dp=DPConfig(mechanism="gaussian_adaptive", noise_multiplier=1.0))


def test_dp_needs_uniform_weighting_and_pld_needs_poisson():
    with pytest.raises(ConfigError, match="server.weighting"):
        SimConfig(dp=DPConfig(mechanism="gaussian"))
    with pytest.raises(ConfigError, match="dp.accountant"):
        SimConfig(server=ServerConfig(weighting="uniform"),
                  dp=DPConfig(mechanism="gaussian", accountant="pld"))


def _small_dp(**dp) -> SimConfig:
    return SimConfig(clients=20, clients_per_round=5, rounds=4, local_epochs=1, batch_size=10,
                     model=ModelConfig(name="logreg"), ray=RayConfig(workers=1), progress=False,
                     server=ServerConfig(weighting="uniform"), dp=DPConfig(**dp))


def test_simulation_records_epsilon_every_round_as_dp_accounting_computes_it(warm_actors):
    from fedsim.simulation import run_simulation

    res = run_simulation(_small_dp(mechanism="gaussian", noise_multiplier=1.1,
                                   l2_norm_clip=0.5), actors=warm_actors)
    delta = default_delta(20)
    for r in res.metrics:
        direct = RdpAccountant(neighboring_relation=REPLACE)
        direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            20, 5, dp_accounting.GaussianDpEvent(1.1 / 2)), r["round"])
        assert r["epsilon"] == pytest.approx(direct.get_epsilon(delta), rel=1e-5)
        assert r["delta"] == delta and r["clip"] == 0.5
        assert r["noise_std"] == pytest.approx(1.1 * 0.5 / 5)
        assert 0 <= r["clipped_fraction"] <= 1
    assert res.summary["privacy"]["rounds_accounted"] == 4


def test_max_epsilon_stops_cleanly_before_exceeding(warm_actors, tmp_path):
    from fedsim.simulation import run_simulation

    # Uniform sampling: replace-one neighbours, so a Laplace round with epsilon=1 for
    # add/remove is a 2-DP release; two rounds spend about 4, a third about 6 > 5.
    budget = 5.0
    cfg = _small_dp(mechanism="laplace", sensitivity=1.0, epsilon=1.0, max_epsilon=budget)
    res = run_simulation(dataclasses.replace(cfg, rounds=10), tmp_path / "run", actors=warm_actors)
    assert len(res.metrics) == 2
    assert all(r["epsilon"] <= budget for r in res.metrics)
    assert "max_epsilon" in res.summary["stop_reason"]
    assert res.summary["status"] == "completed"
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("dp", [
    dict(mechanism="gaussian", target_epsilon=4.0, max_epsilon=4.0),
    dict(mechanism="gaussian_adaptive", target_epsilon=8.0, max_epsilon=8.0,
         clipped_count_stddev=5.0),
    dict(mechanism="laplace", target_epsilon=3.0, max_epsilon=3.0),
])
def test_target_epsilon_equal_to_max_epsilon_runs_every_round(dp):
    """The budget check the simulation makes before each round (the predicted event
    against the ledger of the events the query really reported) lets all rounds
    of a run calibrated to exactly its budget run."""
    import numpy as np

    from fedsim.privacy.queries import DPQueryAggregator

    cfg = _sim(**dp)
    cfg = dataclasses.replace(cfg, dp=calibrate(cfg))
    agg = DPQueryAggregator(cfg.dp, cfg.clients_per_round)
    state = agg.initial_state()
    acct = PrivacyAccountant("rdp", "uniform", 200, 20, default_delta(200))
    predicted = acct.round_event(mechanism_event(cfg.dp, 20))
    for _ in range(cfg.rounds):
        assert acct.epsilon_after(predicted) <= cfg.dp.max_epsilon
        params = agg.client_params(state)
        partial = agg.accumulate(params, agg.zero_partial(3), np.ones(3, np.float32), 1)
        _, state, m = agg.finalize(state, partial, 20, np.random.default_rng(0))
        acct.record(acct.round_event(m["dp_event"]))
    assert dp["target_epsilon"] * (1 - 1e-3) <= acct.epsilon() <= dp["target_epsilon"]


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_resumed_calibration_counts_the_ledger(mechanism):
    """More rounds on resume: the rounds left are calibrated so that the ledger plus
    them spend the target (ignoring the ledger overspends it)."""
    first = _sim(mechanism=mechanism, target_epsilon=4.0)
    dp1 = calibrate(first)
    acct = PrivacyAccountant("rdp", "uniform", 200, 20, default_delta(200))
    for _ in range(10):
        acct.record(acct.round_event(mechanism_event(dp1, 20)))
    longer = dataclasses.replace(first, rounds=60)
    dp2 = calibrate(longer, acct.ledger, rounds_done=10)
    after = acct.epsilon_after(acct.round_event(mechanism_event(dp2, 20)), 50)
    assert 4.0 * (1 - 1e-3) <= after <= 4.0
    naive = calibrate(longer)  # calibrated for 60 fresh rounds
    assert acct.epsilon_after(acct.round_event(mechanism_event(naive, 20)), 50) > 4.0
    with pytest.raises(ConfigError, match="already spent"):
        calibrate(dataclasses.replace(first, dp=dataclasses.replace(first.dp,
                                                                    target_epsilon=0.5)),
                  acct.ledger, rounds_done=10)


def test_secure_rounding_is_charged_to_central_mechanisms():
    """Stochastic fixed-point rounding raises a clipped update's L2 norm by up to
    sqrt(d) / scale: measured on the real codec, and charged by the accountant."""
    import math

    import numpy as np

    from fedsim.config import SecAggConfig
    from fedsim.privacy.accounting import (
        build_accountant,
        round_down_noise,
        rounded_sensitivity_factors,
    )
    from fedsim.secure.fixedpoint import FixedPointCodec

    d, bits, clip = 400, 2, 1.0
    l2, l1 = rounded_sensitivity_factors(d, bits)
    assert l2 == pytest.approx(1 + math.sqrt(d) / 4) and l1 == pytest.approx(1 + d / 4)
    codec = FixedPointCodec.for_sum(clip, 1, precision_bits=bits)
    rng = np.random.default_rng(0)
    x = rng.normal(size=d)
    x *= clip / np.linalg.norm(x)
    norms = [np.linalg.norm(codec.decode_sum(codec.encode(x, rng), 1)) for _ in range(50)]
    assert max(norms) > 1.5 * clip  # rounding really moves it beyond the clip
    assert max(norms) <= clip * l2 + 1e-9
    plain = SimConfig(clients=100, clients_per_round=10, server=ServerConfig(weighting="uniform"),
                      dp=DPConfig(mechanism="gaussian", noise_multiplier=0.5))
    secure = dataclasses.replace(plain, secagg=SecAggConfig(protocol="secagg",
                                                            precision_bits=bits))
    event = mechanism_event(plain.dp, 10)
    eps = {}
    for name, cfg in [("plain", plain), ("secure", secure)]:
        acct = build_accountant(cfg, d)
        acct.record(acct.round_event(event))
        eps[name] = acct.epsilon()
    direct = RdpAccountant(neighboring_relation=REPLACE)
    direct.compose(round_down_noise(dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(0.5 / 2 / l2))))  # as the ledger records it
    assert eps["secure"] == pytest.approx(direct.get_epsilon(default_delta(100)), rel=1e-6)
    assert eps["secure"] > 2 * eps["plain"]
    with pytest.raises(ValueError, match="model size"):
        build_accountant(secure)


def test_a_ledger_under_another_relation_or_accountant_is_refused_in_one_line():
    from fedsim.privacy.accounting import LedgerError, check_ledger

    uniform = _sim(mechanism="gaussian")
    acct = PrivacyAccountant("rdp", "uniform", 200, 20, default_delta(200))
    acct.record(acct.round_event(mechanism_event(uniform.dp, 20)))
    poisson = dataclasses.replace(uniform, sampling="poisson")
    with pytest.raises(LedgerError, match="sampling=poisson changes the neighbouring") as err:
        check_ledger(poisson, acct.ledger, dataclasses.asdict(uniform))
    assert "\n" not in str(err.value)
    adaptive = _sim(mechanism="gaussian_adaptive", clipped_count_stddev=5.0)
    adaptive = dataclasses.replace(adaptive, sampling="poisson")
    rdp = PrivacyAccountant("rdp", "poisson", 200, 20, default_delta(200))
    rdp.record(rdp.round_event(mechanism_event(adaptive.dp, 20)))
    to_pld = dataclasses.replace(adaptive, dp=dataclasses.replace(adaptive.dp, accountant="pld"))
    with pytest.raises(LedgerError, match="dp.accountant=pld cannot compose"):
        check_ledger(to_pld, rdp.ledger, dataclasses.asdict(adaptive))
    check_ledger(adaptive, rdp.ledger, dataclasses.asdict(adaptive))  # unchanged: fine


@pytest.mark.parametrize("scheme, min_sep, rounds, k", [("min_sep", 5, 23, 5),
                                                        ("epochs", None, 23, 3)])
@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_unamplified_schemes_charge_the_most_participations_without_amplification(
        scheme, min_sep, rounds, k, kind):
    """sampling=min_sep (b = 5) or epochs (100 clients, 10 per round: 10 rounds an
    epoch): after 23 rounds a client is in at most k rounds; the run spends k
    unamplified Gaussian releases, RDP k * alpha / (2 z^2) computed directly
    (PLD: dp-accounting's PLD of the same k releases)."""
    from fedsim.config import SamplingConfig

    cfg = SimConfig(clients=100, clients_per_round=10, rounds=rounds,
                    sampling=SamplingConfig(scheme=scheme, min_sep=min_sep),
                    server=ServerConfig(weighting="uniform"),
                    dp=DPConfig(mechanism="gaussian", noise_multiplier=1.1, accountant=kind))
    acct = build_accountant(cfg)
    for _ in range(rounds):
        acct.record(acct.round_event(dp_accounting.GaussianDpEvent(1.1)))
    if kind == "rdp":
        orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)
        direct = float(rdp_privacy_accountant.compute_epsilon(
            orders, k * orders / (2 * 1.1 ** 2), acct.delta)[0])
    else:
        pld = PLDAccountant()
        pld.compose(dp_accounting.GaussianDpEvent(1.1), k)
        direct = pld.get_epsilon(acct.delta)
    assert acct.epsilon() == pytest.approx(direct, rel=1e-9)

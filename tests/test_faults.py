"""Faults: worker actors that die mid-round (the round is re-run on a restarted
actor), and simulated client dropouts, stragglers and over-selection."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from helpers import small_config, without_timings

from fedsim.cohort.faults import plan_round, sample_size
from fedsim.config import DPConfig, FaultsConfig, SecAggConfig, ServerConfig
from fedsim.errors import FedsimError
from fedsim.privacy.accounting import PrivacyAccountant
from fedsim.results.checkpoint import load_checkpoint
from fedsim.simulation import run_simulation


def _cfg(**kw):
    return small_config(clients_per_round=6, **kw)


def test_worker_crash_mid_round_is_retried_with_the_same_result(warm_actors):
    # On warm actors: the worker that dies is restarted in its bundle and the
    # restart takes its place in the cache (a fresh pool restarts it the same way).
    reference = run_simulation(_cfg(), actors=warm_actors)
    before = warm_actors.handles()  # the server, then the workers
    crashed = run_simulation(_cfg(faults=FaultsConfig(crash_worker_at_round=2)),
                             actors=warm_actors)
    assert [r["retries"] for r in crashed.metrics] == [0, 1, 0]
    assert (without_timings(crashed.metrics, also={"retries"})
            == without_timings(reference.metrics, also={"retries"}))
    assert (crashed.weights == reference.weights).all()
    after = warm_actors.handles()
    assert after[0] == before[0] and after[1] != before[1] and after[2:] == before[2:]
    again = run_simulation(_cfg(), actors=warm_actors)  # on the restarted worker
    assert warm_actors.handles() == after
    assert without_timings(again.metrics) == without_timings(reference.metrics)
    assert (again.weights == reference.weights).all()


def test_past_the_retry_bound_a_clear_error_and_a_checkpoint(warm_actors, tmp_path):
    # Under secure aggregation, whose messages go actor to actor as object refs:
    # the dead worker still surfaces as such.
    cfg = _cfg(faults=FaultsConfig(crash_worker_at_round=2, max_retries=0),
               secagg=SecAggConfig(protocol="secagg_plus"),
               server=ServerConfig(weighting="uniform"))
    with pytest.raises(FedsimError, match=r"round 2: worker actors died 1 times .*resume="):
        run_simulation(cfg, tmp_path / "run", actors=warm_actors)
    assert load_checkpoint(tmp_path / "run")["round"] == 1  # (resuming: test_checkpoint.py)
    assert len(warm_actors) == 0  # a failed run's actors are stopped, not kept


# -- simulated client faults: dropouts, stragglers, over-selection -------------------

def _plan(n=100_000, k=None, seed=3, **kw):
    faults = FaultsConfig(**kw)
    return plan_round(np.arange(n), k or n, faults, np.random.default_rng(seed))


def test_dropouts_happen_at_the_configured_rate():
    n, p = 100_000, 0.2
    plan = _plan(n, client_dropout=p)
    sd = np.sqrt(n * p * (1 - p))
    assert abs(plan.dropped.size - n * p) < 5 * sd
    assert plan.reporting.size + plan.dropped.size == n
    assert np.intersect1d(plan.reporting, plan.dropped).size == 0


def test_stragglers_are_the_clients_slower_than_the_deadline():
    n = 100_000
    plan = _plan(n, device_speed_sigma=1.0, straggler_timeout=2.0)
    p = 0.5 * math.erfc(math.log(2.0) / math.sqrt(2))  # P(exp(Z) > 2)
    assert abs(plan.stragglers.size - n * p) < 5 * np.sqrt(n * p * (1 - p))
    # Turning dropouts on removes clients but does not redraw the others' times.
    both = _plan(n, client_dropout=0.3, device_speed_sigma=1.0, straggler_timeout=2.0)
    assert set(both.stragglers) == set(plan.stragglers) - set(both.dropped)
    assert _plan(n, device_speed_sigma=1.0).stragglers.size == 0  # no deadline, none late


def test_over_selection_keeps_the_first_k_to_finish():
    n, k = 1000, 700
    plan = _plan(n, k=k, device_speed_sigma=0.5, over_selection=0.4, client_dropout=0.1)
    assert plan.reporting.size == k
    rng = np.random.default_rng(3)
    rng.random(n)
    times = np.exp(0.5 * rng.standard_normal(n))
    assert times[plan.reporting].max() <= times[plan.unused].min()
    assert not set(plan.dropped) & (set(plan.reporting) | set(plan.unused))
    assert sample_size(10, FaultsConfig(over_selection=0.3), 100) == 13
    assert sample_size(10, FaultsConfig(over_selection=0.3), 12) == 12


def test_client_faults_in_a_simulation_and_the_accountant_charges_the_sampled_cohort(warm_actors):
    faults = FaultsConfig(client_dropout=0.2, device_speed_sigma=1.0, straggler_timeout=2.0,
                          over_selection=0.5)
    dp = DPConfig(mechanism="gaussian", noise_multiplier=1.0)
    cfg = _cfg(rounds=4, faults=faults, dp=dp, server=ServerConfig(weighting="uniform"))
    res = run_simulation(cfg, actors=warm_actors)
    for r in res.metrics:
        assert r["sampled"] == 9  # ceil(6 * 1.5)
        assert r["clients"] == r["sampled"] - r["dropped"] - r["stragglers"] - r["unused"]
        assert r["clients"] <= 6
    assert sum(r["dropped"] for r in res.metrics) > 0
    assert sum(r["stragglers"] for r in res.metrics) > 0
    assert sum(r["unused"] for r in res.metrics) > 0
    acct = PrivacyAccountant("rdp", "uniform", 20, 9, res.summary["privacy"]["delta"])
    for _ in range(4):
        acct.record(acct.round_event(dp_accounting.GaussianDpEvent(1.0)))
    assert res.summary["privacy"]["epsilon"] == pytest.approx(acct.epsilon(), rel=1e-9)

"""The privacy cost of tuning (fedsim.privacy.tuning): the search's epsilon under
composition and under Papernot-Steinke's repeat and select, against direct
dp-accounting computations of the same events, and read from runs' summaries.
Pure: no Ray, no TensorFlow."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.dp_event import RepeatAndSelectDpEvent
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedsim.errors import FedsimError
from fedsim.privacy.accounting import PrivacyAccountant
from fedsim.privacy.tuning import (
    mixture_repeat_and_select_epsilon,
    run_event,
    search_privacy,
    tuning_privacy,
)
from fedsim.results.summary import encoded_run_event

DELTA = 1e-5
ADD_REMOVE = NeighboringRelation.ADD_OR_REMOVE_ONE


def trial(z: float, rounds: int = 60, q: float = 0.1) -> dpa.DpEvent:
    """A Poisson-sampled DP-FedAvg run: ``rounds`` releases of noise multiplier z."""
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)


def direct(event: dpa.DpEvent, relation=ADD_REMOVE) -> float:
    acct = RdpAccountant(neighboring_relation=relation)
    acct.compose(event)
    return acct.get_epsilon(DELTA)


def test_composed_epsilon_equals_dp_accounting_composing_each_trial():
    events = [trial(1.0), trial(0.8, rounds=30), trial(1.5, q=0.2)]
    acct = RdpAccountant(neighboring_relation=ADD_REMOVE)
    for e in events:  # one by one: another path than one ComposedDpEvent
        acct.compose(e)
    got = tuning_privacy(events, DELTA)
    assert got.trials == 3 and got.delta == DELTA and got.relation == "ADD_OR_REMOVE_ONE"
    assert got.composed_epsilon == pytest.approx(acct.get_epsilon(DELTA), rel=1e-12)
    assert got.composed_epsilon > max(direct(e) for e in events)


def test_composing_k_gaussian_trials_is_one_gaussian_of_noise_z_over_sqrt_k():
    """RDP of a Gaussian is alpha / (2 z^2): k of them are one of noise z / sqrt(k)."""
    got = tuning_privacy([dpa.GaussianDpEvent(4.0)] * 4, DELTA)
    assert got.composed_epsilon == pytest.approx(direct(dpa.GaussianDpEvent(2.0)), rel=1e-9)


@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, math.inf])
def test_repeat_and_select_epsilon_equals_dp_accounting_event(shape):
    events = [trial(1.0)] * 8
    got = tuning_privacy(events, DELTA, mean_trials=8, shape=shape)
    want = direct(RepeatAndSelectDpEvent(trial(1.0), 8.0, shape))
    assert got.repeat_and_select_epsilon == pytest.approx(want, rel=1e-12)
    assert (got.mean_trials, got.shape, got.note) == (8.0, shape, "")


def test_repeat_and_select_pays_a_little_for_many_trials_composition_a_lot():
    one = direct(trial(1.0))
    few, many = (tuning_privacy([trial(1.0)] * k, DELTA) for k in (2, 20))
    assert one < few.repeat_and_select_epsilon < many.repeat_and_select_epsilon
    assert many.repeat_and_select_epsilon < many.composed_epsilon / 2
    # the mean defaults to the number of trials; a larger mean costs more
    assert tuning_privacy([trial(1.0)] * 2, DELTA, mean_trials=20).repeat_and_select_epsilon \
        == pytest.approx(many.repeat_and_select_epsilon, rel=1e-12)


def test_differing_trials_are_bounded_by_their_pointwise_worst_rdp():
    """Equal events: the mixture bound is RepeatAndSelectDpEvent's number. A less
    noisy trial dominates at every order: the mixture's bound is its own."""
    assert mixture_repeat_and_select_epsilon([trial(1.0)] * 3, DELTA, ADD_REMOVE, 3, 1.0) == \
        pytest.approx(tuning_privacy([trial(1.0)] * 3, DELTA).repeat_and_select_epsilon,
                      rel=1e-12)
    got = tuning_privacy([trial(2.0), trial(1.0), trial(3.0)], DELTA)
    assert "differ" in got.note
    assert got.repeat_and_select_epsilon == pytest.approx(
        direct(RepeatAndSelectDpEvent(trial(1.0), 3.0, 1.0)), rel=1e-9)
    assert math.isinf(tuning_privacy([trial(1.0), trial(0.0)], DELTA).composed_epsilon)


@pytest.mark.parametrize("sampling, relation", [
    ("uniform", "REPLACE_ONE"), ("poisson", "ADD_OR_REMOVE_ONE"), ("epochs", "REPLACE_SPECIAL")])
def test_run_event_in_the_summary_is_the_runs_epsilon(sampling, relation):
    """The event summary.json records (through JSON) has the run's own epsilon, and
    a search of two such runs composes both under the run's relation."""
    acct = PrivacyAccountant("rdp", sampling, 100, 10, DELTA,
                             participations=lambda r: math.ceil(r / 10))
    for _ in range(12):
        acct.record(acct.round_event(dpa.GaussianDpEvent(0.8)))
    if sampling == "poisson":  # two distinct round events (a resume with new noise)
        acct.record(acct.round_event(dpa.GaussianDpEvent(1.1)))
    summary = json.loads(json.dumps({"privacy": {
        "event": encoded_run_event(acct), "delta": acct.delta,
        "neighboring_relation": acct.relation.name}}))
    event = run_event(summary)
    assert direct(event, acct.relation) == pytest.approx(acct.epsilon(), rel=1e-9)
    got = search_privacy([summary, summary])
    assert got.relation == relation and got.trials == 2
    assert got.composed_epsilon == pytest.approx(
        direct(dpa.ComposedDpEvent([event, event]), NeighboringRelation[relation]), rel=1e-12)


def test_searches_that_cannot_be_accounted_are_refused_in_one_line():
    a = {"privacy": {"event": {"$dp_event": "GaussianDpEvent", "noise_multiplier": 1.0},
                     "delta": DELTA, "neighboring_relation": "REPLACE_ONE"}}
    b = json.loads(json.dumps(a))
    b["privacy"]["neighboring_relation"] = "ADD_OR_REMOVE_ONE"
    with pytest.raises(FedsimError, match="different neighbouring relations"):
        search_privacy([a, b])
    with pytest.raises(FedsimError, match="without privacy.event"):
        search_privacy([a, {"privacy": {"mechanism": "none", "epsilon": None}}])
    with pytest.raises(FedsimError, match="not a DpEvent fedsim knows"):
        run_event({"privacy": {"event": {"$dp_event": "Pickled", "x": 1}}})
    with pytest.raises(FedsimError, match="delta=1.5"):
        tuning_privacy([dpa.GaussianDpEvent(1.0)], 1.5)
    with pytest.raises(FedsimError, match="no trial"):
        tuning_privacy([], DELTA)
    assert run_event({"privacy": {"mechanism": "none", "epsilon": None}}) is None

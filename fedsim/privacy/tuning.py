"""The privacy cost of tuning: every trial of a search that trains on the same
private population spends privacy, and so does choosing among them.

Two bounds on the whole search, both computed by dp-accounting's RDP accountant
under the trials' neighbouring relation, at one ``delta``:

- composition: the search is the ``ComposedDpEvent`` of every trial's event.
  It holds for any search (a grid, Optuna's adaptive TPE, a fixed number of
  trials) and for releasing every trial's result (the sweep table does).
- repeat and select (Papernot and Steinke, ICLR 2022, arXiv:2110.03620):
  ``RepeatAndSelectDpEvent(trial event, mean, shape)``: the number of trials is
  random, drawn from a truncated negative binomial of ``shape`` (0
  logarithmic, 1 geometric, ``inf`` Poisson) with mean ``mean``, each trial
  runs independently of the others' results (random search), and only the
  best trial's result is released. The trial is one mechanism: hyperparameters
  drawn at random. When every trial has the same event (hyperparameters that
  leave the noise alone: learning rates, and the clip when the noise is a
  multiple of it) that is the event; otherwise the mixture is bounded by the
  largest RDP of the trials at each order.

A run's event is in its ``summary.json`` (``privacy.event``, encoded as
checkpoints encode events; ``privacy.neighboring_relation``):
:func:`run_event` reads it, and :func:`search_privacy` does the whole sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import dp_accounting
from dp_accounting import DpEvent, NeighboringRelation, dp_event
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedsim.errors import FedsimError


@dataclass(frozen=True)
class TuningPrivacy:
    """The epsilon of a whole search at ``delta``.

    trials: how many trial events were composed. composed_epsilon: the
    composition of all of them. repeat_and_select_epsilon: the Papernot-Steinke
    bound for a random number of trials of mean ``mean_trials`` and
    distribution ``shape``, releasing only the best (through
    ``RepeatAndSelectDpEvent`` when every trial has the same event, else
    :func:`mixture_repeat_and_select_epsilon`; ``note`` says so). Epsilons are
    ``inf`` without noise.
    """

    delta: float
    trials: int
    composed_epsilon: float
    repeat_and_select_epsilon: Optional[float]
    mean_trials: float
    shape: float
    relation: str
    note: str = ""


def _epsilon(event: DpEvent, delta: float, relation: NeighboringRelation) -> float:
    acct = RdpAccountant(neighboring_relation=relation)
    if not acct.supports(event):
        raise FedsimError(f"tuning privacy: dp-accounting's RDP accountant cannot compose "
                          f"{type(event).__name__} under {relation.name} (fedsim's own "
                          "Skellam and discrete Gaussian events are not dp-accounting's)")
    acct.compose(event)
    eps = float(acct.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def _grouped(events: Sequence[DpEvent]) -> DpEvent:
    """The composition of ``events`` with equal events as one SelfComposedDpEvent
    (the same RDP, each distinct event's curve computed once)."""
    return dp_accounting.ComposedDpEvent(
        [e if c == 1 else dp_accounting.SelfComposedDpEvent(e, c) for e, c in _distinct(events)])


def _distinct(events: Sequence[DpEvent]) -> list[tuple[DpEvent, int]]:
    """Each distinct event (by equality: events with lists do not hash) and its count."""
    out: list[list[Any]] = []
    for e in events:
        for entry in out:
            if entry[0] == e:
                entry[1] += 1
                break
        else:
            out.append([e, 1])
    return [(e, int(c)) for e, c in out]


def tuning_privacy(events: Sequence[DpEvent], delta: float, *,
                   relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
                   mean_trials: Optional[float] = None, shape: float = 1.0) -> TuningPrivacy:
    """Both epsilons of a search whose trials had ``events`` (one DpEvent per
    trial: its whole run), at ``delta``, under ``relation``.

    mean_trials: the mean of the random number of trials (default: as many as
    ``events``, >= 1); shape: its distribution (0 logarithmic, 1 geometric,
    ``math.inf`` Poisson, in between truncated negative binomial).
    """
    events = list(events)
    if not events:
        raise FedsimError("tuning privacy: no trial with a privacy event")
    if not 0 < delta < 1:
        raise FedsimError(f"tuning privacy: delta={delta}: allowed is a number in (0, 1)")
    mean = float(len(events) if mean_trials is None else mean_trials)
    if not mean >= 1:
        raise FedsimError(f"tuning privacy: mean_trials={mean_trials}: allowed is a number >= 1")
    if not shape >= 0:
        raise FedsimError(f"tuning privacy: shape={shape}: allowed is a number >= 0 (0 "
                          "logarithmic, 1 geometric, inf Poisson)")
    composed = _epsilon(_grouped(events), delta, relation)
    if all(e == events[0] for e in events[1:]):
        selected = _epsilon(dp_event.RepeatAndSelectDpEvent(events[0], mean, shape),
                            delta, relation)
        note = ""
    else:
        selected = mixture_repeat_and_select_epsilon(events, delta, relation, mean, shape)
        note = ("the trials' events differ: the trial is their mixture (hyperparameters "
                "drawn at random), bounded by the pointwise maximum of their RDP curves")
    return TuningPrivacy(delta, len(events), composed, selected, mean, float(shape),
                         relation.name, note)


def mixture_repeat_and_select_epsilon(events: Sequence[DpEvent], delta: float,
                                      relation: NeighboringRelation, mean: float,
                                      shape: float) -> float:
    """The repeat-and-select epsilon when the trials' events differ.

    A random-search trial draws its hyperparameters from a fixed distribution,
    so it is a mixture of the trials' mechanisms; Rényi divergence is jointly
    quasi-convex, so the mixture's RDP at each order is at most the largest of
    the trials' RDP at that order. That curve goes through the same formula as
    ``RepeatAndSelectDpEvent`` (dp-accounting's ``_compute_rdp_repeat_and_select``,
    Papernot and Steinke's Theorems 2 and 6); for identical events it is the
    same number.
    """
    import numpy as np
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    orders = np.asarray(rdp.DEFAULT_RDP_ORDERS, np.float64)
    curves = []
    for event, _ in _distinct(events):  # each distinct event once
        acct = RdpAccountant(list(orders), neighboring_relation=relation)
        if not acct.supports(event):
            _epsilon(event, delta, relation)  # raises the one-line error
        acct.compose(event)
        curves.append(acct.rdp)
    worst = np.max(np.vstack(curves), axis=0)
    if not np.all(np.isfinite(worst)):
        return math.inf
    selected = rdp._compute_rdp_repeat_and_select(list(orders), list(worst), mean, shape)
    eps = float(rdp.compute_epsilon(orders, selected, delta)[0])
    return eps if math.isfinite(eps) else math.inf


def run_event(summary: Mapping[str, Any]) -> Optional[DpEvent]:
    """The DpEvent of a whole run from its summary.json (``privacy.event``), or
    None for a run without DP (or a summary written before it was recorded)."""
    from fedsim.results.checkpoint import decode_state

    payload = (summary.get("privacy") or {}).get("event")
    if payload is None:
        return None
    try:
        event = decode_state(payload, {})
    except Exception as err:  # an unknown or malformed event (CheckpointError, ...)
        raise FedsimError(f"privacy.event: not a DpEvent fedsim knows ({err})") from err
    if not isinstance(event, DpEvent):
        raise FedsimError(f"privacy.event: not a DpEvent ({type(event).__name__})")
    return event


def search_privacy(summaries: Sequence[Mapping[str, Any]], delta: Optional[float] = None, *,
                   mean_trials: Optional[float] = None,
                   shape: float = 1.0) -> TuningPrivacy:
    """:func:`tuning_privacy` of the trials whose ``summaries`` are given (all
    must be private runs under one neighbouring relation; ``delta`` default:
    the largest of the trials' deltas)."""
    events, relations, deltas = [], set(), []
    for s in summaries:
        privacy = s.get("privacy") or {}
        event = run_event(s)
        if event is None:
            raise FedsimError("tuning privacy: a trial without privacy.event in its "
                              "summary.json (no DP, no rounds, or written before fedsim "
                              "recorded it)")
        events.append(event)
        relations.add(privacy.get("neighboring_relation"))
        deltas.append(float(privacy["delta"]))
    if len(relations) != 1:
        raise FedsimError("tuning privacy: the trials were accounted under different "
                          f"neighbouring relations ({', '.join(sorted(map(str, relations)))}); "
                          "their epsilons do not compose")
    relation = NeighboringRelation[relations.pop()]
    return tuning_privacy(events, max(deltas) if delta is None else delta, relation=relation,
                          mean_trials=mean_trials, shape=shape)

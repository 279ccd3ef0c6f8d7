"""Aggregation of client updates, as a protocol over explicit state.

The protocol follows TF Privacy's ``DPQuery`` so that differentially private
aggregators fit the same slots:

=====================  =========================  ==================================
fedsim                 DPQuery                    where it runs
=====================  =========================  ==================================
``initial_state``      ``initial_global_state``   server actor, once
``client_params``      ``derive_sample_params``   server actor, once per round
``zero_partial``       ``initial_sample_state``   worker actor
``accumulate``         ``preprocess_record`` +    worker actor, per client (clipping
                       ``accumulate_preprocessed``  happens here, where updates are made)
``merge``              ``merge_sample_states``    server actor, per worker
``finalize``           ``get_noised_result``      server actor, once per round (noise
                                                  is added here, once)
=====================  =========================  ==================================

Workers send one :class:`Partial` (a partial sum) each, never per-client
vectors. Aggregators are pure: they return new values and never mutate their
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np



@dataclass(frozen=True)
class Partial:
    """A partial sum over some clients of one round.

    total: sum over clients of ``weight * delta`` (float64, the model's size);
      for DP aggregators the sum of the clipped updates.
    weight: sum of the clients' weights.
    count: number of clients summed.
    stats: additive statistics for metrics (e.g. how many were clipped).
    extras: further additive parts of the aggregator's sample state (e.g. the
      adaptive clip's count of unclipped clients), in a fixed order.
    """

    total: np.ndarray
    weight: float
    count: int
    stats: Mapping[str, float] = field(default_factory=dict)
    extras: tuple[np.ndarray, ...] = ()


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Sum two partials (their totals, weights, counts and stats)."""
    stats = dict(a.stats)
    for k, v in b.stats.items():
        stats[k] = stats.get(k, 0.0) + v
    if len(a.extras) != len(b.extras):
        raise ValueError("cannot merge partials of different aggregators")
    extras = tuple(x + y for x, y in zip(a.extras, b.extras))
    return Partial(a.total + b.total, a.weight + b.weight, a.count + b.count, stats, extras)


class Aggregator(Protocol):
    """What the server actor and the workers need from an aggregator."""

    def initial_state(self) -> dict[str, Any]: ...

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]: ...

    def zero_partial(self, size: int) -> Partial: ...

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: int) -> Partial:
        """One client's preprocessed record (clipped, weighted), not yet summed:
        ``accumulate(params, p, delta, n) == merge(p, record(params, delta, n))``.
        Secure aggregation encodes records instead of summing them."""
        ...

    def accumulate(self, params: Mapping[str, Any], partial: Partial, delta: np.ndarray,
                   num_examples: int) -> Partial: ...

    def merge(self, a: Partial, b: Partial) -> Partial: ...

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, float]]:
        """Return (aggregate update, new state, measurements of this round)."""
        ...


class MeanAggregator:
    """The FedAvg aggregate: a weighted mean of the client deltas.

    weighting ``num_examples``: ``sum_k n_k * delta_k / sum_k n_k`` (TFF's
    ``build_weighted_fed_avg``); ``uniform``: ``sum_k delta_k / K`` with K the
    number of clients that reported. No clipping and no noise. An update with a
    NaN or infinite coordinate is replaced by zeros (as TFF's zeroing factory
    does) and counted in the ``zeroed`` measurement, so it never reaches the model.
    """

    def __init__(self, weighting: str = "num_examples") -> None:
        if weighting not in ("num_examples", "uniform"):
            raise ValueError(f"weighting must be num_examples or uniform, got {weighting!r}")
        self.weighting = weighting

    def initial_state(self) -> dict[str, Any]:
        return {}

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def zero_partial(self, size: int) -> Partial:
        return Partial(np.zeros(size, np.float64), 0.0, 0, {"zeroed": 0.0})

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: int) -> Partial:
        w = float(num_examples) if self.weighting == "num_examples" else 1.0
        d = np.asarray(delta, np.float64)
        finite = bool(np.isfinite(d).all())
        return Partial(w * d if finite else np.zeros_like(d), w, 1, {"zeroed": float(not finite)})

    def accumulate(self, params: Mapping[str, Any], partial: Partial, delta: np.ndarray,
                   num_examples: int) -> Partial:
        return merge_partials(partial, self.record(params, delta, num_examples))

    def merge(self, a: Partial, b: Partial) -> Partial:
        return merge_partials(a, b)

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, float]]:
        if partial.weight <= 0:
            mean = np.zeros_like(partial.total, dtype=np.float32)
        else:
            mean = (partial.total / partial.weight).astype(np.float32)
        return mean, dict(state), {"zeroed": int(partial.stats.get("zeroed", 0.0))}

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
vectors; only aggregates that are not sums (the robust aggregators of
:mod:`fedsim.aggregation.robust`, a TFF factory) carry a stack of the clients'
records instead. Aggregators are pure: they return new values and never mutate
their inputs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np


@dataclass(frozen=True)
class Partial:
    """A partial sum over some clients of one round.

    total: sum over clients of ``weight * delta`` (float64, the model's size);
      for DP aggregators the sum of the clipped updates; for robust aggregators
      the [clients, size] stack of the (clipped) updates.
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
    _add_stats(stats, len(a.extras), b)
    extras = tuple(x + y for x, y in zip(a.extras, b.extras))
    return Partial(a.total + b.total, a.weight + b.weight, a.count + b.count, stats, extras)


def _add_stats(stats: dict[str, float], num_extras: int, b: Partial) -> None:
    """Add ``b``'s stats into ``stats``, those of a partial with ``num_extras``
    extras; first, refuse a ``b`` of another aggregator (other extras)."""
    if len(b.extras) != num_extras:
        raise ValueError("cannot merge partials of different aggregators")
    for k, v in b.stats.items():
        stats[k] = stats.get(k, 0.0) + v


def _add_into(mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """``mine + theirs``, in ``mine``'s memory where the sum has ``mine``'s dtype."""
    if np.result_type(mine, theirs) != mine.dtype:
        return mine + theirs
    return np.add(mine, theirs, out=mine)


class RunningSum:
    """A worker's running partial sum of ``aggregator``'s records, added in place:
    after ``add(delta, n)`` per client, :meth:`partial` is bit for bit
    ``accumulate`` folded over them from ``start`` (``merge_partials`` of the
    records), without a new model-sized array per client. ``start``'s arrays are
    copied once, so it is not changed."""

    def __init__(self, aggregator: "Aggregator", params: Mapping[str, Any],
                 start: Partial) -> None:
        self.aggregator, self.params = aggregator, params
        self.total = np.array(start.total, copy=True)
        self.extras = [np.array(e, copy=True) for e in start.extras]
        self.weight, self.count, self.stats = start.weight, start.count, dict(start.stats)

    def add(self, delta: np.ndarray, num_examples: float) -> None:
        record = self.aggregator.record(self.params, delta, num_examples)
        _add_stats(self.stats, len(self.extras), record)
        self.total = _add_into(self.total, record.total)
        self.extras = [_add_into(m, t) for m, t in zip(self.extras, record.extras)]
        self.weight += record.weight
        self.count += record.count

    def partial(self) -> Partial:
        return Partial(self.total, self.weight, self.count, self.stats, tuple(self.extras))


class _Folding:
    """The default running partial: ``accumulate`` per client."""

    def __init__(self, aggregator: "Aggregator", params: Mapping[str, Any],
                 start: Partial) -> None:
        self.aggregator, self.params, self.sum = aggregator, params, start

    def add(self, delta: np.ndarray, num_examples: float) -> None:
        self.sum = self.aggregator.accumulate(self.params, self.sum, delta, num_examples)

    def partial(self) -> Partial:
        return self.sum


class Aggregator(ABC):
    """What the server actor and the workers need from an aggregator.

    Subclasses implement two methods, :meth:`record` (one client's preprocessed
    record) and :meth:`finalize` (the round's aggregate from the summed records);
    this base class supplies the sum semantics (``zero_partial``, ``accumulate``,
    ``merge``) and the capabilities' defaults. The server asks the aggregator what
    it can do instead of reading config strings:

    - :meth:`current_clip`: the clip norm this round (None: it does not clip);
    - :attr:`supports_secure_sum`: whether its records may be summed under secure
      aggregation (they must be additive and unweighted);
    - :meth:`secure_codec`: a fixed-point codec of its own for the update segment
      under secure aggregation (e.g. one that adds each client's noise share);
    - :meth:`integer_noise`: noise the server adds to the unmasked integer sum;
    - :meth:`close`: release what it holds outside Python;
    - :attr:`sums_records`: its ``accumulate`` and ``merge`` are the plain sum
      of records (this base class's), so a worker may add its clients'
      records in place (:meth:`running`); a subclass that overrides either
      must leave it False.
    """

    supports_secure_sum: bool = True
    sums_records: bool = False

    def initial_state(self) -> dict[str, Any]:
        """The aggregator's state before round 1 (server actor)."""
        return {}

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """What every client of the round needs (e.g. the clip norm), picklable."""
        return {}

    def zero_stats(self) -> dict[str, float]:
        """The additive statistics of an empty partial sum (their keys)."""
        return {}

    def zero_partial(self, size: int) -> Partial:
        """The empty partial sum for updates of ``size`` parameters."""
        return Partial(np.zeros(size, np.float64), 0.0, 0, self.zero_stats())

    @abstractmethod
    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        """One client's preprocessed record (clipped, weighted), not yet summed:
        ``accumulate(params, p, delta, n) == merge(p, record(params, delta, n))``.
        Secure aggregation encodes records instead of summing them."""

    def accumulate(self, params: Mapping[str, Any], partial: Partial, delta: np.ndarray,
                   num_examples: float) -> Partial:
        """``partial`` plus one client's record (worker actor); ``num_examples``:
        the client's weight under example weighting (a canary's is the mean)."""
        return self.merge(partial, self.record(params, delta, num_examples))

    def merge(self, a: Partial, b: Partial) -> Partial:
        """The sum of two partial sums (server actor, once per worker)."""
        return merge_partials(a, b)

    def running(self, params: Mapping[str, Any], start: Partial) -> Any:
        """A worker's running partial over its clients, from ``start``: ``add(delta,
        num_examples)`` per client, then ``partial()``, which equals folding
        :meth:`accumulate` over the same clients, bit for bit. With
        :attr:`sums_records` the records are added in place
        (:class:`RunningSum`); otherwise ``accumulate`` is called per client."""
        if self.sums_records:
            return RunningSum(self, params, start)
        return _Folding(self, params, start)

    @abstractmethod
    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        """Return (aggregate update (float32), new state, measurements of this round).

        ``rng``: the round's privacy-noise stream (draw the noise from it, once).
        ``num_sampled``: clients sampled this round (the reporting ones are
        ``partial.count``). A noisy release puts its DpEvent in the measurements
        under ``dp_event``; the driver hands it to the accountant."""

    # -- capabilities -----------------------------------------------------------
    def current_clip(self, state: Mapping[str, Any]) -> Optional[float]:
        """The norm bound on one client's record this round; None: no clipping."""
        return None

    def secure_codec(self, num_clients: int, precision_bits: int) -> Any:
        """A fixed-point codec for the update segment of the secure sum of
        ``num_clients`` records, or None for the plain rounding codec."""
        return None

    def integer_noise(self, rng: np.random.Generator, size: int,
                      scale: float) -> Optional[np.ndarray]:
        """Noise (int64, ``size`` coordinates, ``scale`` units per 1.0) the server
        adds to the unmasked integer sum before decoding; None: none."""
        return None

    def close(self) -> None:
        """Release resources held outside Python (e.g. a child process)."""


def zero_invalid(delta: np.ndarray, zeroing_norm: Optional[float],
                 dtype: Any = np.float64) -> tuple[np.ndarray, float, bool]:
    """TFF's zeroing: ``(update, its L2 norm, zeroed)`` with a non-finite update,
    or one of L2 norm above ``zeroing_norm``, replaced by zeros."""
    d = np.asarray(delta, dtype)
    norm = float(np.linalg.norm(d.astype(np.float64, copy=False)))
    zeroed = not math.isfinite(norm) or (zeroing_norm is not None and norm > zeroing_norm)
    if zeroed:
        return np.zeros_like(d), 0.0, True
    return d, norm, False


def l2_clipped(delta: np.ndarray, clip: float, zeroing_norm: Optional[float]
               ) -> tuple[np.ndarray, float, bool]:
    """``(update, its L2 norm before clipping, zeroed)``: :func:`zero_invalid`,
    then clipped to L2 norm ``clip`` as ``tf.clip_by_global_norm`` does
    (``x * clip / max(|x|, clip)``), in float64."""
    d, norm, zeroed = zero_invalid(delta, zeroing_norm, np.float64)
    return scaled_to_l2(d, norm, clip), norm, zeroed


def scaled_to_l2(delta: np.ndarray, norm: float, clip: float) -> np.ndarray:
    """``delta`` (of L2 norm ``norm``) clipped to L2 norm ``clip`` as
    ``tf.clip_by_global_norm`` does (``x * clip / max(|x|, clip)``), in float64."""
    factor = clip / max(norm, clip) if norm > 0 else 1.0
    # (x * 1.0 is x: an update within the clip is not multiplied, nor copied)
    return np.asarray(delta * factor if factor != 1.0 else delta, np.float64)


def below_estimate(norm: float, estimate: float) -> float:
    """TF Privacy's quantile-estimator record: whether the float32 ``norm`` is
    at most the float32 ``estimate`` (1 or 0), shifted by -0.5 (its count's clip)."""
    return float(np.float32(norm) <= np.float32(estimate)) - 0.5


def clip_measurements(partial: Partial, clip: float, noise_std: float,
                      event: Any) -> dict[str, Any]:
    """The measurements every clipping DP aggregator reports for a round."""
    return {"clip": clip,
            "clipped_fraction": partial.stats.get("clipped", 0.0) / max(partial.count, 1),
            "zeroed": int(partial.stats.get("zeroed", 0.0)),
            "noise_std": noise_std,
            "dp_event": event}


class MeanAggregator(Aggregator):
    """The FedAvg aggregate: a weighted mean of the client deltas.

    weighting ``num_examples``: ``sum_k n_k * delta_k / sum_k n_k`` (TFF's
    ``build_weighted_fed_avg``); ``uniform``: ``sum_k delta_k / K`` with K the
    number of clients that reported. No clipping and no noise. An update with a
    NaN or infinite coordinate is replaced by zeros (as TFF's zeroing factory
    does) and counted in the ``zeroed`` measurement, so it never reaches the model.
    """

    sums_records = True

    def __init__(self, weighting: str = "num_examples") -> None:
        if weighting not in ("num_examples", "uniform"):
            raise ValueError(f"weighting must be num_examples or uniform, got {weighting!r}")
        self.weighting = weighting

    @property
    def supports_secure_sum(self) -> bool:  # type: ignore[override]
        """Only unweighted records are summed securely (the sum carries no weights)."""
        return self.weighting == "uniform"

    def zero_stats(self) -> dict[str, float]:
        return {"zeroed": 0.0}

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        w = float(num_examples) if self.weighting == "num_examples" else 1.0
        d = np.array(delta, np.float64)  # (a copy: the record is not the caller's array)
        finite = bool(np.isfinite(d).all())
        total = (d if w == 1.0 else w * d) if finite else np.zeros_like(d)  # (1.0 * d is d)
        return Partial(total, w, 1, {"zeroed": float(not finite)})

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, float]]:
        if partial.weight <= 0:
            mean = np.zeros_like(partial.total, dtype=np.float32)
        else:
            mean = (partial.total / partial.weight).astype(np.float32)
        return mean, dict(state), {"zeroed": int(partial.stats.get("zeroed", 0.0))}

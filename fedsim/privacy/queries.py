"""Differentially private aggregation: TF Privacy's DPQuery objects, run in fedsim's
aggregation protocol exactly as TFF's ``DifferentiallyPrivateFactory`` runs them.

The queries are TFF's:

- ``gaussian``: ``NormalizedQuery(GaussianSumQuery(C, z * C), clients_per_round)``
  (``DifferentiallyPrivateFactory.gaussian_fixed``).
- ``gaussian_adaptive``: ``NormalizedQuery(QuantileAdaptiveClipSumQuery(...),
  clients_per_round)`` with TFF's defaults and noise split
  (``DifferentiallyPrivateFactory.gaussian_adaptive``).
- ``laplace``: ``NormalizedQuery(LaplaceSumQuery(s, s / epsilon), clients_per_round)``,
  a DPQuery written here (TF Privacy has no Laplace sum query).

Where each step runs: ``derive_sample_params`` in the server actor;
``preprocess_record`` (the clipping) and the summing in the worker actors, on
behalf of each client; ``merge`` and ``get_noised_result`` (noise, added once)
in the server actor. Before that, non-finite updates and updates with L2 norm
above ``zeroing_norm`` are replaced by zeros (TFF's zeroing factory).

The workers' clipping is each query's ``clip_record``: the same function as its
``preprocess_record`` (``tf.clip_by_global_norm``'s ``x * C / max(|x|, C)``, the
below-estimate indicator, the L1 factor), computed in numpy in float64 on the
float32 update. It differs from TF Privacy's float32 result only by float32
rounding (tests/test_privacy.py compares the two), and it costs a client a
fraction of what one TensorFlow call does.

Noise has true tails and is reproducible. TF Privacy's queries would draw
float32 ``tf.random.normal`` noise, which never exceeds 5.678 standard
deviations (:mod:`fedsim.privacy.noise`); here every Gaussian sum query in the tree
(the update sum and, for adaptive clipping, the unclipped count) is a
:class:`HostNoiseGaussianSumQuery`, which draws float64 noise from numpy
(:func:`fedsim.privacy.noise.gaussian`) and adds it to the float64 sum. The server hands
the round's noise stream ``(noise seed, NOISE, round)`` to the aggregator for
the round's single noisy release; the sum's noise is drawn first, then the
count's. Everything else on the server (the clip's geometric update, the
reported DpEvents) is TF Privacy's code.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import dp_accounting
import numpy as np
import tensorflow as tf
from tensorflow_privacy.privacy.dp_query import dp_query
from tensorflow_privacy.privacy.dp_query.gaussian_query import GaussianSumQuery
from tensorflow_privacy.privacy.dp_query.normalized_query import NormalizedQuery
from tensorflow_privacy.privacy.dp_query.quantile_adaptive_clip_sum_query import (
    QuantileAdaptiveClipSumQuery,
)
from tensorflow_privacy.privacy.dp_query.quantile_estimator_query import QuantileEstimatorQuery

from fedsim.aggregation.base import (
    Aggregator,
    Partial,
    below_estimate,
    clip_measurements,
    scaled_to_l2,
    zero_invalid,
)
from fedsim.config import DPConfig, SimConfig
from fedsim.privacy import noise
from fedsim.privacy.noise import adaptive_clip_noise_params


class NoiseSource:
    """The generator that this round's noisy release draws from.

    One source is shared by all the host-noise queries of an aggregator; the
    server sets it around the release with :meth:`drawing`. Asking for noise
    outside that scope raises, so no release can fall back on an unseeded stream.
    """

    def __init__(self) -> None:
        self._rng: np.random.Generator | None = None

    def drawing(self, rng: np.random.Generator) -> "_Drawing":
        return _Drawing(self, rng)

    def rng(self) -> np.random.Generator:
        if self._rng is None:
            raise RuntimeError("privacy noise requested outside NoiseSource.drawing(rng)")
        return self._rng


class _Drawing:
    def __init__(self, source: NoiseSource, rng: np.random.Generator) -> None:
        self.source, self.rng = source, rng

    def __enter__(self) -> None:
        self.source._rng = self.rng

    def __exit__(self, *exc: object) -> None:
        self.source._rng = None


def _host_noised(sample_state: Any, draw: Any) -> Any:
    """Each leaf of ``sample_state`` as float64 plus ``draw(rng, shape)``, in its dtype."""
    def one(v: tf.Tensor) -> tf.Tensor:
        x = np.asarray(v, np.float64)
        return tf.constant((x + draw(x.shape)).astype(v.dtype.as_numpy_dtype))

    return tf.nest.map_structure(one, sample_state)


class HostNoiseGaussianSumQuery(GaussianSumQuery):
    """TF Privacy's ``GaussianSumQuery`` with float64 numpy noise of true tails.

    Clipping, the state and the reported ``GaussianDpEvent(stddev / clip)`` are
    the parent's. ``get_noised_result`` runs eagerly (in the server actor):
    each leaf of the summed records gets :func:`fedsim.privacy.noise.gaussian` noise of
    std ``global_state.stddev`` from ``source``'s generator, added in float64;
    the result keeps the leaf's dtype (the update sum is packed as float64, so
    it is cast to float32 only after normalization).
    """

    def __init__(self, source: NoiseSource, l2_norm_clip: float, stddev: float) -> None:
        super().__init__(l2_norm_clip, stddev)
        self._source = source

    def clip_record(self, params: Any, delta: np.ndarray, norm: float
                    ) -> tuple[list[np.ndarray], float]:
        """``preprocess_record`` in numpy: ``([delta clipped to L2 norm params], norm)``.

        delta: the update (float64), norm: its L2 norm; ``params``: the clip (the
        float32 sample param). The clipped update is float64."""
        return [scaled_to_l2(delta, norm, float(np.float32(params)))], norm

    def get_noised_result(self, sample_state: Any, global_state: Any) -> Any:
        rng, std = self._source.rng(), float(global_state.stddev)
        result = _host_noised(sample_state, lambda shape: noise.gaussian(rng, shape, std))
        event = dp_accounting.GaussianDpEvent(global_state.stddev / global_state.l2_norm_clip)
        return result, global_state, event


class HostNoiseQuantileEstimatorQuery(QuantileEstimatorQuery):
    """TF Privacy's quantile estimator whose noised count is a host-noise query
    (through the parent's own hook, ``_construct_below_estimate_query``)."""

    def __init__(self, source: NoiseSource, *args: Any, **kwargs: Any) -> None:
        self._source = source
        super().__init__(*args, **kwargs)

    def _construct_below_estimate_query(self, below_estimate_stddev: float,
                                        expected_num_records: float) -> dp_query.DPQuery:
        # As the parent: records are below-estimate indicators shifted by -0.5,
        # so the count's sensitivity (its "clip") is 0.5.
        return NormalizedQuery(
            HostNoiseGaussianSumQuery(self._source, 0.5, below_estimate_stddev),
            denominator=expected_num_records)


class HostNoiseQuantileAdaptiveClipSumQuery(QuantileAdaptiveClipSumQuery):
    """TF Privacy's ``QuantileAdaptiveClipSumQuery`` (TFF's ``gaussian_adaptive``)
    with both of its Gaussian releases drawing host noise. The parent builds
    its sum query and quantile estimator in ``__init__``; this subclass builds
    the same two with the same arguments, drawing from ``source``."""

    def __init__(self, source: NoiseSource, initial_l2_norm_clip: float,
                 noise_multiplier: float, target_unclipped_quantile: float,
                 learning_rate: float, clipped_count_stddev: float,
                 expected_num_records: float, geometric_update: bool = True) -> None:
        super().__init__(initial_l2_norm_clip, noise_multiplier, target_unclipped_quantile,
                         learning_rate, clipped_count_stddev, expected_num_records,
                         geometric_update)
        self._quantile_estimator_query = HostNoiseQuantileEstimatorQuery(
            source, initial_l2_norm_clip, target_unclipped_quantile, learning_rate,
            clipped_count_stddev, expected_num_records, geometric_update)
        self._sum_query = HostNoiseGaussianSumQuery(
            source, initial_l2_norm_clip, noise_multiplier * initial_l2_norm_clip)

    def clip_record(self, params: Any, delta: np.ndarray, norm: float
                    ) -> tuple[list[np.ndarray], float]:
        """``preprocess_record`` in numpy: ``([clipped delta, below], norm)``, with
        ``below`` TF Privacy's indicator that the float32 norm is at most the
        current estimate, shifted by -0.5 (the count query's clip, 0.5, leaves
        it as it is)."""
        (clipped,), _ = self._sum_query.clip_record(params.sum_params, delta, norm)
        below = below_estimate(norm, params.quantile_estimator_params.current_estimate)
        return [clipped, np.array(below, np.float64)], norm


class LaplaceSumQuery(dp_query.SumAggregationDPQuery):
    """Sum of records clipped to L1 norm ``l1_norm_clip``, plus Laplace noise.

    Every coordinate of the sum gets independent Laplace noise of scale ``scale``
    (std ``sqrt(2) * scale``), float64 from :func:`fedsim.privacy.noise.laplace` (drawn
    from ``source``'s generator) added to the float64 sum. Adding or removing
    one record changes the sum by at most ``l1_norm_clip`` in L1, so a release
    is ``l1_norm_clip / scale``-DP; the DpEvent is
    ``LaplaceDpEvent(scale / l1_norm_clip)``.
    """

    def __init__(self, source: NoiseSource, l1_norm_clip: float, scale: float) -> None:
        self._source = source
        self._l1_norm_clip = float(l1_norm_clip)
        self._scale = float(scale)

    def initial_global_state(self) -> Any:
        return {"l1_norm_clip": tf.constant(self._l1_norm_clip, tf.float32),
                "scale": tf.constant(self._scale, tf.float32)}

    def derive_sample_params(self, global_state: Any) -> Any:
        return global_state["l1_norm_clip"]

    def preprocess_record(self, params: Any, record: Any) -> Any:
        leaves = tf.nest.flatten(record)
        l1 = tf.add_n([tf.reduce_sum(tf.abs(tf.cast(v, tf.float32))) for v in leaves])
        factor = tf.minimum(1.0, params / tf.maximum(l1, 1e-30))
        return tf.nest.map_structure(lambda v: v * tf.cast(factor, v.dtype), record)

    def clip_record(self, params: Any, delta: np.ndarray, norm: float
                    ) -> tuple[list[np.ndarray], float]:
        """``preprocess_record`` in numpy: ``([delta scaled to L1 norm at most
        params], its L1 norm)`` (float64)."""
        l1 = float(np.abs(delta).sum())
        factor = min(1.0, float(np.float32(params)) / max(l1, 1e-30))
        return [delta * factor], l1

    def get_noised_result(self, sample_state: Any, global_state: Any) -> Any:
        rng, scale = self._source.rng(), self._scale
        result = _host_noised(sample_state, lambda shape: noise.laplace(rng, shape, scale))
        event = dp_accounting.LaplaceDpEvent(self._scale / self._l1_norm_clip)
        return result, global_state, event


def build_sum_query(dp: DPConfig, clients_per_round: int,
                    source: NoiseSource | None = None) -> Any:
    """The sum query of the DPQuery that TFF's factory builds for ``dp`` (see the
    module docstring; the aggregator wraps it in ``NormalizedQuery``), its noise
    drawn from ``source`` (a new one if None); it has ``clip_record``."""
    cpr = float(clients_per_round)
    source = source if source is not None else NoiseSource()
    if dp.mechanism == "gaussian":
        inner: dp_query.DPQuery = HostNoiseGaussianSumQuery(
            source, l2_norm_clip=dp.l2_norm_clip, stddev=dp.l2_norm_clip * dp.noise_multiplier)
    elif dp.mechanism == "gaussian_adaptive":
        z_sum, count_std = adaptive_clip_noise_params(dp.noise_multiplier, cpr,
                                                      dp.clipped_count_stddev)
        inner = HostNoiseQuantileAdaptiveClipSumQuery(
            source, initial_l2_norm_clip=dp.initial_l2_norm_clip, noise_multiplier=z_sum,
            target_unclipped_quantile=dp.target_unclipped_quantile,
            learning_rate=dp.clip_learning_rate, clipped_count_stddev=count_std,
            expected_num_records=cpr, geometric_update=True)
    elif dp.mechanism == "laplace":
        inner = LaplaceSumQuery(source, dp.sensitivity, dp.sensitivity / dp.epsilon)
    else:
        raise ValueError(f"no DP query for dp.mechanism={dp.mechanism!r}")
    return inner


def python_event(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
    """The same DpEvent with TensorFlow scalars turned into Python numbers."""
    import attr

    def conv(v: Any) -> Any:
        if isinstance(v, dp_accounting.DpEvent):
            return python_event(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, (tf.Tensor, np.generic, np.ndarray)):
            return float(np.asarray(v))
        return v

    return attr.evolve(event, **{f.name: conv(getattr(event, f.name))
                                 for f in attr.fields(type(event))})


def _to_numpy(nest: Any) -> Any:
    return tf.nest.map_structure(lambda t: np.asarray(t), nest)


class DPQueryAggregator(Aggregator):
    """fedsim's aggregation protocol over a TF Privacy ``DPQuery``.

    State: ``{"query": the query's global state}``. The aggregate returned by
    ``finalize`` is the noised, normalized sum: ``(sum of clipped updates +
    noise) / clients_per_round``, as a float32 vector.
    """

    sums_records = True

    def __init__(self, dp: DPConfig, clients_per_round: int) -> None:
        self.dp = dp
        self.clients_per_round = int(clients_per_round)
        self.noise_source = NoiseSource()
        self.sum_query = build_sum_query(dp, clients_per_round, self.noise_source)
        self.query = NormalizedQuery(self.sum_query, denominator=float(clients_per_round))
        self.zeroing_norm = dp.zeroing_norm

    # -- server side -----------------------------------------------------------------
    def initial_state(self) -> dict[str, Any]:
        return {"query": self.query.initial_global_state()}

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The query's sample params (e.g. the current clip), as numpy for shipping."""
        return {"query": _to_numpy(self.query.derive_sample_params(state["query"])),
                "clip": self.current_clip(state)}

    def current_clip(self, state: Mapping[str, Any]) -> float:
        """The clip norm used this round (L2 for Gaussian, L1 for Laplace)."""
        if self.dp.mechanism == "gaussian_adaptive":
            metrics = self.query.derive_metrics(state["query"])
            return float(metrics["clip"])
        return float(self.dp.sensitivity if self.dp.mechanism == "laplace"
                     else self.dp.l2_norm_clip)

    # -- worker side -----------------------------------------------------------------
    def zero_partial(self, size: int) -> Partial:
        template = tf.zeros([size], tf.float32)
        flat = [np.asarray(t, np.float64)
                for t in tf.nest.flatten(self.query.initial_sample_state(template))]
        return Partial(flat[0], 0.0, 0, {"clipped": 0.0, "zeroed": 0.0}, tuple(flat[1:]))

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        """One client's record: the update zeroed if non-finite or huge, then
        clipped by the query (its ``clip_record``, ``preprocess_record`` in numpy)."""
        delta, norm, zeroed = zero_invalid(delta, self.zeroing_norm, np.float64)
        flat, size = self.sum_query.clip_record(params["query"], delta, norm)
        clipped = size > params["clip"]
        return Partial(flat[0], 1.0, 1, {"clipped": float(clipped), "zeroed": float(zeroed)},
                       tuple(flat[1:]))

    # -- server side, once per round -----------------------------------------------
    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        """Add the noise (once, from ``rng``) and normalize; returns the DpEvent in
        measurements. The update sum stays float64 through the noise and the
        division by clients_per_round, and is cast to float32 at the end."""
        template = self.query.initial_sample_state(tf.zeros(partial.total.shape, tf.float32))
        sample_state = tf.nest.pack_sequence_as(
            template, [tf.constant(partial.total, tf.float64)]
            + [tf.constant(p, tf.float32) for p in partial.extras])
        clip = self.current_clip(state)
        with self.noise_source.drawing(rng):
            result, new_query_state, event = self.query.get_noised_result(sample_state,
                                                                          state["query"])
        measurements = clip_measurements(partial, clip, self.noise_std(state),
                                         python_event(event))
        return np.asarray(result, np.float32), {"query": new_query_state}, measurements

    def noise_std(self, state: Mapping[str, Any]) -> float:
        """Std of the noise on each coordinate of the averaged update this round."""
        dp, cpr = self.dp, self.clients_per_round
        if dp.mechanism == "laplace":
            return math.sqrt(2.0) * dp.sensitivity / dp.epsilon / cpr
        if dp.mechanism == "gaussian":
            return dp.noise_multiplier * dp.l2_norm_clip / cpr
        z_sum, _ = adaptive_clip_noise_params(dp.noise_multiplier, cpr, dp.clipped_count_stddev)
        return z_sum * self.current_clip(state) / cpr


def build_dp_aggregator(cfg: SimConfig) -> DPQueryAggregator:
    return DPQueryAggregator(cfg.dp, cfg.clients_per_round)

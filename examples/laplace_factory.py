"""A Laplace-noise DP aggregation factory for TensorFlow Federated, done right.

The seed article's ``LaplaceAggregator`` does not work with TFF and is not
differentially private as written:

- ``create`` must return a ``tff.templates.AggregationProcess`` built from TFF
  *federated* computations (``initialize_fn: () -> S@SERVER``, ``next_fn: (S@SERVER,
  {V}@CLIENTS) -> MeasuredProcessOutput(S@SERVER, V@SERVER, M@SERVER)``); plain
  lambdas and a ``tf.function`` taking ``(value, weights)`` are refused.
- Nothing bounds a client's contribution, so no finite noise scale gives DP:
  each client's update must be clipped (here to L1 norm ``l1_norm_clip``, the
  Laplace mechanism's sensitivity) before the sum.
- Noise must go on the *sum* (once, at the server); the sum is then divided by
  a fixed ``clients_per_round`` (like TFF's ``DifferentiallyPrivateFactory``),
  which keeps the sensitivity known.
- ``tf.random.stateless_laplace`` does not exist, and drawing the stateless
  seed from the global generator inside a traced computation gives the same
  "random" seed every round. Here the seed lives in the process state and
  advances every round, so noise is fresh each round and reproducible (also
  across checkpoint and resume).
- ``tff.learning.build_federated_averaging_process`` is gone; pass the factory
  as ``model_aggregator`` to ``tff.learning.algorithms.build_unweighted_fed_avg``
  (it is unweighted), or run it in fedsim::

    PYTHONPATH=. uv run python scripts/simulate.py aggregator=tff \
        aggregator.factory=examples.laplace_factory:LaplaceFactory \
        +aggregator.args.l1_norm_clip=1.0 +aggregator.args.epsilon=1.0 \
        +aggregator.args.clients_per_round=10 +aggregator.args.seed=0

(``PYTHONPATH=.`` from the repository root makes ``examples`` importable in the
driver and in Ray's local workers.)

Each round releases ``sum_k clip_1(v_k) + Laplace(b)^d`` with ``b = l1_norm_clip /
epsilon``: epsilon-DP per round under add/remove of one client. The DpEvent,
``LaplaceDpEvent(b / l1_norm_clip)``, is reported in the measurements as
``dp_event`` (the named-tuple form TFF uses), which fedsim's accountant composes.
The idiomatic alternative is a TF Privacy ``DPQuery`` wrapped in
``tff.aggregators.DifferentiallyPrivateFactory(NormalizedQuery(query, n))``;
fedsim's :class:`fedsim.privacy.queries.LaplaceSumQuery` is such a query.
"""

from __future__ import annotations

import collections
from typing import Optional

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


class LaplaceFactory(tff.aggregators.UnweightedAggregationFactory):
    """Clip each client value to L1 norm ``l1_norm_clip``, sum, add Laplace noise of
    scale ``l1_norm_clip / epsilon`` to every coordinate, divide by ``clients_per_round``.

    seed: the noise stream's seed; None draws one from the OS when the factory
    is made (then runs are not reproducible).
    """

    def __init__(self, l1_norm_clip: float, epsilon: float, clients_per_round: float,
                 seed: Optional[int] = None) -> None:
        if not l1_norm_clip > 0 or not epsilon > 0 or not clients_per_round > 0:
            raise ValueError("l1_norm_clip, epsilon and clients_per_round must be > 0, got "
                             f"{l1_norm_clip}, {epsilon}, {clients_per_round}")
        self._clip = float(l1_norm_clip)
        self._scale = float(l1_norm_clip) / float(epsilon)
        self._denominator = float(clients_per_round)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
        self._seed = int(seed)

    def create(self, value_type: tff.types.Type) -> tff.templates.AggregationProcess:
        specs = tff.types.type_to_tf_tensor_specs(value_type)
        if not all(s.dtype.is_floating for s in tf.nest.flatten(specs)):
            raise TypeError(f"LaplaceFactory aggregates floating-point values, got {value_type}")
        clip, scale, denominator = self._clip, self._scale, self._denominator
        seed0 = [self._seed % 2**31, self._seed // 2**31 % 2**31]

        @tff.tensorflow.computation
        def initial_seed():
            return tf.constant(seed0, tf.int64)

        @tff.federated_computation
        def init_fn():
            return tff.federated_eval(initial_seed, tff.SERVER)

        @tff.tensorflow.computation(value_type)
        def clip_l1(value):
            leaves = tf.nest.flatten(value)
            norm = tf.add_n([tf.reduce_sum(tf.abs(tf.cast(v, tf.float64))) for v in leaves])
            factor = tf.minimum(tf.constant(1.0, tf.float64), clip / tf.maximum(norm, 1e-30))
            clipped = tf.nest.map_structure(lambda v: v * tf.cast(factor, v.dtype), value)
            return clipped, tf.cast(norm > clip, tf.int32)

        summed_type = clip_l1.type_signature.result[0]
        seed_type = initial_seed.type_signature.result

        @tff.tensorflow.computation(seed_type, summed_type)
        def noise_and_normalize(seed, total):
            leaves = tf.nest.flatten(total)
            seeds = tf.random.experimental.stateless_split(seed, num=2 * len(leaves) + 1)
            noised = []
            for i, v in enumerate(leaves):
                # Laplace(b) = b * (E1 - E2), E = -log(1 - U) ~ Exp(1), U ~ U[0, 1).
                e1 = -tf.math.log1p(-tf.random.stateless_uniform(tf.shape(v), seeds[2 * i],
                                                                  dtype=tf.float32))
                e2 = -tf.math.log1p(-tf.random.stateless_uniform(tf.shape(v), seeds[2 * i + 1],
                                                                  dtype=tf.float32))
                noise = tf.cast(scale * (e1 - e2), v.dtype)
                noised.append((v + noise) / tf.cast(denominator, v.dtype))
            return tf.nest.pack_sequence_as(total, noised), seeds[-1]

        @tff.tensorflow.computation
        def dp_event():
            return dp_accounting.LaplaceDpEvent(scale / clip).to_named_tuple()

        @tff.federated_computation(init_fn.type_signature.result,
                                   tff.FederatedType(value_type, tff.CLIENTS))
        def next_fn(state, value):
            clipped = tff.federated_map(clip_l1, value)
            total = tff.federated_sum(clipped[0])
            clipped_count = tff.federated_sum(clipped[1])
            result, new_seed = tff.federated_map(noise_and_normalize, (state, total))
            measurements = tff.federated_zip(collections.OrderedDict(
                clipped_count=clipped_count,
                dp_event=tff.federated_eval(dp_event, tff.SERVER)))
            return tff.templates.MeasuredProcessOutput(state=new_seed, result=result,
                                                       measurements=measurements)

        return tff.templates.AggregationProcess(init_fn, next_fn)

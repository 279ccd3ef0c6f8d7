"""FedAvg arithmetic of the aggregation protocol, and the server optimizers
against TFF's own ``tff.learning.optimizers`` formulas."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.aggregation.base import MeanAggregator, Partial
from fedsim.algorithms.optimizers import ServerOptimizer
from fedsim.config import ServerConfig


def _random_updates(k: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    deltas = [rng.normal(size=d).astype(np.float32) for _ in range(k)]
    counts = [int(c) for c in rng.integers(1, 50, size=k)]
    return deltas, counts


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_mean_equals_hand_computed_mean_over_any_split(weighting):
    deltas, counts = _random_updates(7, 33)
    agg = MeanAggregator(weighting)
    w = np.array(counts, float) if weighting == "num_examples" else np.ones(len(counts))
    expected = sum(wi * d.astype(np.float64) for wi, d in zip(w, deltas)) / w.sum()

    # Split the clients over three "workers" unevenly, merge on the "server".
    parts = []
    for shard in ([0, 1, 2], [3], [4, 5, 6]):
        p = agg.zero_partial(33)
        for i in shard:
            p = agg.accumulate({}, p, deltas[i], counts[i])
        parts.append(p)
    merged = agg.zero_partial(33)
    for p in parts:
        merged = agg.merge(merged, p)
    result, state, _ = agg.finalize({}, merged, 7, np.random.default_rng(0))
    assert merged.count == 7
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)
    assert state == {}


def test_accumulate_does_not_mutate_inputs():
    agg = MeanAggregator()
    p = agg.zero_partial(4)
    delta = np.ones(4, np.float32)
    q = agg.accumulate({}, p, delta, 3)
    assert np.all(p.total == 0) and p.count == 0 and p.stats == {"zeroed": 0.0}
    assert np.all(delta == 1)
    assert np.all(q.total == 3)


def _aggregators():
    from fedsim.aggregation.median import MedianAggregator
    from fedsim.config import DPConfig
    from fedsim.privacy.queries import DPQueryAggregator

    adaptive = DPQueryAggregator(DPConfig(mechanism="gaussian_adaptive", noise_multiplier=0.5,
                                          initial_l2_norm_clip=3.0), 50)
    return [MeanAggregator(), MeanAggregator("uniform"), adaptive, MedianAggregator()]


@pytest.mark.parametrize("index", range(4))
def test_running_partial_is_accumulate_folded_bit_for_bit(index):
    """A worker's running partial (in place for aggregators whose records are
    plainly summed) equals folding ``accumulate`` over the same clients, bit for
    bit, with the stats and extras, and leaves its start as it was."""
    agg = _aggregators()[index]
    params = agg.client_params(agg.initial_state())
    deltas, counts = _random_updates(9, 57, seed=index)
    deltas[4][3] = np.nan  # a zeroed client among them
    start = agg.zero_partial(57)
    start_total = start.total.copy()
    folded = start
    running = agg.running(params, start)
    for d, n in zip(deltas, counts):
        folded = agg.accumulate(params, folded, d, n)
        running.add(d, n)
    got = running.partial()
    assert np.array_equal(got.total, folded.total, equal_nan=True)
    assert got.total.dtype == folded.total.dtype
    assert (got.weight, got.count, got.stats) == (folded.weight, folded.count, folded.stats)
    assert len(got.extras) == len(folded.extras)
    assert all(np.array_equal(a, b) for a, b in zip(got.extras, folded.extras))
    assert np.array_equal(start.total, start_total) and start.count == 0
    assert agg.sums_records == (index < 3)  # the median stacks its records
    if agg.sums_records:
        assert np.abs(got.total).sum() > 0 and got.stats["zeroed"] == 1.0


def test_non_finite_updates_are_zeroed_and_counted():
    agg = MeanAggregator("uniform")
    p = agg.zero_partial(3)
    for u in ([1.0, 2.0, 3.0], [np.nan, 0.0, 0.0], [0.0, np.inf, 0.0], [3.0, 2.0, 1.0]):
        p = agg.accumulate({}, p, np.array(u, np.float32), 5)
    result, _, m = agg.finalize({}, p, 4, np.random.default_rng(0))
    assert m["zeroed"] == 2
    np.testing.assert_allclose(result, [1.0, 1.0, 1.0])  # (u1 + 0 + 0 + u4) / 4
    assert np.all(np.isfinite(result))


def test_empty_round_gives_zero_update():
    agg = MeanAggregator()
    result, _, _ = agg.finalize({}, agg.zero_partial(5), 0, np.random.default_rng(0))
    assert np.all(result == 0)


def test_merge_sums_stats():
    a = Partial(np.zeros(2), 1.0, 1, {"clipped": 1.0})
    b = Partial(np.ones(2), 2.0, 2, {"clipped": 2.0, "zeroed": 1.0})
    m = MeanAggregator().merge(a, b)
    assert m.stats == {"clipped": 3.0, "zeroed": 1.0} and m.count == 3 and m.weight == 3.0


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", {"learning_rate": 1.0}),
    ("sgd", {"learning_rate": 0.5, "momentum": 0.9}),
    ("adam", {"learning_rate": 0.01}),
    ("yogi", {"learning_rate": 0.01}),
    ("adagrad", {"learning_rate": 0.1}),
    ("adagrad", {"learning_rate": 0.3, "initial_preconditioner": 0.0, "epsilon": 0.01}),
])
def test_server_optimizers_match_tff(name, kwargs):
    import tensorflow as tf
    from tensorflow_federated.python.learning.optimizers import adagrad, adam, sgdm, yogi

    if name == "sgd":
        tff_opt = sgdm.build_sgdm(kwargs["learning_rate"], momentum=kwargs.get("momentum"))
    elif name == "adam":
        tff_opt = adam.build_adam(kwargs["learning_rate"])
    elif name == "adagrad":
        extra = {k: v for k, v in (("initial_preconditioner_value",
                                    kwargs.get("initial_preconditioner")),
                                   ("epsilon", kwargs.get("epsilon"))) if v is not None}
        tff_opt = adagrad.build_adagrad(kwargs["learning_rate"], **extra)
    else:
        tff_opt = yogi.build_yogi(kwargs["learning_rate"])
    ours = ServerOptimizer(ServerConfig(optimizer=name, **kwargs))

    rng = np.random.default_rng(1)
    w = rng.normal(size=50).astype(np.float32)
    tff_w = tf.constant(w)
    tff_state = tff_opt.initialize(tf.TensorSpec(w.shape, tf.float32))
    state = ours.initial_state(w.size)
    for _ in range(6):
        g = rng.normal(size=50).astype(np.float32)
        tff_state, tff_w = tff_opt.next(tff_state, tff_w, tf.constant(g))
        state, w = ours.step(state, w, g)
    np.testing.assert_allclose(w, tff_w.numpy(), rtol=1e-5, atol=1e-6)


def test_running_sum_keeps_merge_partials_dtype_promotion():
    """A summing aggregator whose empty partial is float32 but whose records are
    float64 sums in float64, as merge_partials does (no in-place downcast)."""
    from fedsim.aggregation.base import merge_partials

    class Float32Start(MeanAggregator):
        def zero_partial(self, size):
            return Partial(np.zeros(size, np.float32), 0.0, 0, self.zero_stats())

    agg = Float32Start("uniform")
    deltas, counts = _random_updates(5, 21, seed=3)
    running = agg.running({}, agg.zero_partial(21))
    folded = agg.zero_partial(21)
    for d, n in zip(deltas, counts):
        running.add(d, n)
        folded = merge_partials(folded, agg.record({}, d, n))
    got = running.partial()
    assert got.total.dtype == folded.total.dtype == np.float64
    assert np.array_equal(got.total, folded.total) and got.stats == folded.stats

"""Central DP aggregation: parity with TFF's DifferentiallyPrivateFactory, noise
statistics against theory, and clipping as a property."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedsim.config import DPConfig
from fedsim.privacy.queries import DPQueryAggregator, adaptive_clip_noise_params


def _aggregate(agg, state, updates, rng_seed=0):
    partial = agg.zero_partial(updates[0].size)
    params = agg.client_params(state)
    for u in updates:
        partial = agg.accumulate(params, partial, u, 1)
    return agg.finalize(state, partial, len(updates), np.random.default_rng(rng_seed))


def _client_updates(rng, k, d):
    # Norms spread over two orders of magnitude, so clipping and adaptation matter.
    return [(rng.normal(size=d) * rng.lognormal(-1.0, 1.0) / math.sqrt(d)).astype(np.float32)
            for _ in range(k)]


@pytest.mark.parametrize("mechanism", ["gaussian", "gaussian_adaptive"])
def test_parity_with_tff_differentially_private_factory(mechanism):
    import tensorflow as tf
    import tensorflow_federated as tff

    d, k, rounds = 40, 5, 12
    if mechanism == "gaussian":
        factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=0.0, clients_per_round=float(k), clip=0.3)
        dp = DPConfig(mechanism="gaussian", noise_multiplier=0.0, l2_norm_clip=0.3)
    else:
        factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            noise_multiplier=0.0, clients_per_round=float(k))
        dp = DPConfig(mechanism="gaussian_adaptive", noise_multiplier=0.0)
    process = factory.create(tff.types.TensorType(np.float32, [d]))
    tff_state = process.initialize()
    ours = DPQueryAggregator(dp, k)
    state = ours.initial_state()
    rng = np.random.default_rng(0)
    clips_tff, clips_ours = [], []
    for _ in range(rounds):
        updates = _client_updates(rng, k, d)
        out = process.next(tff_state, updates)
        tff_state = out.state
        result, state, measurements = _aggregate(ours, state, updates)
        np.testing.assert_allclose(result, np.asarray(out.result), rtol=1e-5, atol=1e-7)
        if mechanism == "gaussian_adaptive":
            clips_tff.append(float(out.measurements["dp_query_metrics"]["clip"]))
            clips_ours.append(ours.current_clip(state))
        assert 0.0 <= measurements["clipped_fraction"] <= 1.0
    if mechanism == "gaussian_adaptive":
        np.testing.assert_allclose(clips_ours, clips_tff, rtol=1e-6)
        assert max(clips_ours) / min(clips_ours) > 2  # the clip really moved
    del tf


def test_adaptive_noise_split_and_error_match_tff():
    from tensorflow_federated.python.aggregators import differential_privacy as tff_dp

    for z, cpr in [(0.5, 100.0), (1.0, 50.0), (0.1, 10.0)]:
        assert adaptive_clip_noise_params(z, cpr, None) == pytest.approx(
            tff_dp.adaptive_clip_noise_params(z, cpr, None))
    with pytest.raises(ValueError) as ours:
        adaptive_clip_noise_params(1.0, 10.0, None)
    with pytest.raises(ValueError) as theirs:
        tff_dp.adaptive_clip_noise_params(1.0, 10.0, None)
    assert str(ours.value) == str(theirs.value)


def test_gaussian_noise_std_within_5_sigma_and_reproducible():
    z, clip, cpr, d = 1.3, 0.7, 4, 50_000
    agg = DPQueryAggregator(DPConfig(mechanism="gaussian", noise_multiplier=z, l2_norm_clip=clip),
                            cpr)
    state = agg.initial_state()
    zeros = [np.zeros(d, np.float32)]
    noise, _, m = _aggregate(agg, state, zeros, rng_seed=1)
    sigma = z * clip / cpr
    assert m["noise_std"] == pytest.approx(sigma)
    # Std of a sample std is sigma / sqrt(2 d); of the mean sigma / sqrt(d).
    assert abs(noise.std() - sigma) < 5 * sigma / math.sqrt(2 * d)
    assert abs(noise.mean()) < 5 * sigma / math.sqrt(d)
    again, _, _ = _aggregate(agg, state, zeros, rng_seed=1)
    other, _, _ = _aggregate(agg, state, zeros, rng_seed=2)
    np.testing.assert_array_equal(noise, again)
    assert np.corrcoef(noise, other)[0, 1] < 5 / math.sqrt(d)


def test_laplace_noise_scale_within_5_sigma_and_passes_ks():
    sens, eps, cpr, d = 2.0, 0.5, 5, 50_000
    agg = DPQueryAggregator(DPConfig(mechanism="laplace", sensitivity=sens, epsilon=eps), cpr)
    noise, _, m = _aggregate(agg, agg.initial_state(), [np.zeros(d, np.float32)], rng_seed=3)
    b = sens / eps / cpr  # scale on the average
    assert m["noise_std"] == pytest.approx(math.sqrt(2) * b)
    # MLE of the Laplace scale is mean |x|; its std is b / sqrt(d).
    assert abs(np.abs(noise).mean() - b) < 5 * b / math.sqrt(d)
    # Excess kurtosis of Laplace is 3; the estimate's std is about sqrt(mu8 / sigma^8 / d)
    # with mu8 / sigma^8 = 8! / 2^4 = 2520 for Laplace.
    assert abs(stats.kurtosis(noise) - 3.0) < 5 * math.sqrt(2520 / d)
    assert stats.kstest(noise, "laplace", args=(0.0, b)).pvalue > 1e-3
    # The same test rejects Gaussian noise of the same variance: it can fail.
    gauss = np.random.default_rng(0).normal(scale=math.sqrt(2) * b, size=d)
    assert stats.kstest(gauss, "laplace", args=(0.0, b)).pvalue < 1e-6


@pytest.mark.parametrize("mechanism", ["gaussian", "gaussian_adaptive", "laplace"])
def test_no_client_contributes_more_than_its_clip(mechanism):
    dp = DPConfig(mechanism=mechanism, noise_multiplier=0.0, l2_norm_clip=0.5,
                  initial_l2_norm_clip=0.2, sensitivity=0.8, zeroing_norm=100.0)
    agg = DPQueryAggregator(dp, 3)
    state = agg.initial_state()
    params = agg.client_params(state)
    clip = params["clip"]
    rng = np.random.default_rng(7)
    specials = [0.0, np.nan, np.inf, -np.inf, 1e-30, 1e30]
    norm = np.linalg.norm if mechanism != "laplace" else (lambda v: np.abs(v).sum())
    for trial in range(60):
        d = int(rng.integers(1, 200))
        u = rng.normal(size=d) * 10.0 ** rng.uniform(-4, 3)
        if trial < len(specials):
            u[rng.integers(d)] = specials[trial]
            if trial == 0:
                u[:] = 0.0
        u = u.astype(np.float32)
        one = agg.accumulate(params, agg.zero_partial(d), u, 1)
        contributed = one.total
        assert np.all(np.isfinite(contributed))
        assert norm(contributed) <= clip * (1 + 1e-5)
        raw = np.linalg.norm(u.astype(np.float64))
        zeroed = not np.isfinite(raw) or raw > 100.0
        assert one.stats["zeroed"] == float(zeroed)
        if zeroed:
            assert np.all(contributed == 0)
        elif norm(u.astype(np.float64)) <= clip:
            np.testing.assert_allclose(contributed, u, rtol=1e-6)


@pytest.mark.parametrize("mechanism", ["gaussian", "gaussian_adaptive", "laplace"])
def test_workers_numpy_records_are_tf_privacys_preprocess_record(mechanism):
    """The workers clip in numpy (each query's ``clip_record``); TF Privacy's own
    ``preprocess_record`` on the same float32 update is the oracle: equal up to
    float32 rounding, the below-estimate indicator exactly, on both sides of the clip."""
    import tensorflow as tf

    dp = DPConfig(mechanism=mechanism, noise_multiplier=1.0, l2_norm_clip=0.5,
                  initial_l2_norm_clip=0.2, sensitivity=0.8, zeroing_norm=None)
    agg = DPQueryAggregator(dp, 100)
    params = agg.client_params(agg.initial_state())
    clip = params["clip"]
    norm = np.linalg.norm if mechanism != "laplace" else (lambda v: np.abs(v).sum())
    rng = np.random.default_rng(11)
    for scale in [0.0, 1e-6, 0.3, 0.99, 1.01, 2.0, 1e4]:
        u = rng.normal(size=int(rng.integers(1, 3000)))
        u = (u * (scale * clip / norm(u))).astype(np.float32)
        ours = agg.record(params, u, 1.0)
        theirs = [np.asarray(t, np.float64) for t in tf.nest.flatten(agg.query.preprocess_record(
            tf.nest.map_structure(tf.constant, params["query"]), tf.constant(u)))]
        assert ours.total.dtype == np.float64 and ours.total.shape == u.shape
        np.testing.assert_allclose(ours.total, theirs[0], rtol=2e-6, atol=1e-30)
        assert len(ours.extras) == len(theirs) - 1 == (mechanism == "gaussian_adaptive")
        for a, b in zip(ours.extras, theirs[1:]):
            assert a.shape == b.shape and float(a) == float(b) == (0.5 if scale <= 1 else -0.5)
        assert ours.stats["clipped"] == float(scale > 1)
        if scale > 1:  # clipped to the query's (float32) clip, in float64
            assert norm(ours.total) == pytest.approx(float(np.float32(clip)), rel=1e-12)

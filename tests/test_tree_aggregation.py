"""DP-FTRL's tree aggregation: TF Privacy's tree aggregators node for node, TFF's
tree_aggregation and tree_adaptive factories with noise off, the noise's
statistics against theory, and the accounting against a direct computation."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedsim.config import DPConfig, SamplingConfig, ServerConfig, SimConfig
from fedsim.errors import ConfigError
from fedsim.privacy.accounting import build_accountant
from fedsim.privacy.tree import Restarts, TreeAggregator, TreeNoise, tree_step_counts


def _aggregate(agg, state, updates, rng):
    partial = agg.zero_partial(updates[0].size)
    params = agg.client_params(state)
    for u in updates:
        partial = agg.accumulate(params, partial, u, 1)
    return agg.finalize(state, partial, len(updates), rng)


def _client_updates(rng, k, d):
    return [(rng.normal(size=d) * rng.lognormal(-1.0, 1.0) / math.sqrt(d)).astype(np.float32)
            for _ in range(k)]


class _TableGenerator:
    """A TF Privacy ValueGenerator that hands out the rows of a table in order."""

    def __init__(self, table):
        import tensorflow as tf
        from tensorflow_privacy.privacy.dp_query import tree_aggregation

        class Gen(tree_aggregation.ValueGenerator):
            def initialize(self):
                return tf.constant(0, tf.int32)

            def next(self, state):
                return tf.gather(tf.constant(table, tf.float32), state), state + 1

        self.gen = Gen()


@pytest.mark.parametrize("efficient", [False, True])
def test_tree_noise_equals_tf_privacys_tree_aggregator_node_for_node(efficient):
    """The same node values in, the same cumulative noise out, for 37 leaves and
    a restart: fedsim draws them in TF Privacy's order."""
    from tensorflow_privacy.privacy.dp_query import tree_aggregation

    d, steps = 3, 37
    table = np.random.default_rng(1).normal(size=(200, d)).astype(np.float32)
    tf_agg = (tree_aggregation.EfficientTreeAggregator if efficient
              else tree_aggregation.TreeAggregator)(_TableGenerator(table).gen)
    tf_state = tf_agg.init_state()
    ours = TreeNoise(levels=8, efficient=efficient)
    state = ours.empty(d)
    used = iter(range(len(table)))

    def draw():
        return table[next(used)].astype(np.float64)

    for t in range(steps):
        tf_cum, tf_state = tf_agg.get_cumsum_and_update(tf_state)
        cum, state = ours.cumsum_and_update(state, draw, d)
        np.testing.assert_allclose(cum, np.asarray(tf_cum), rtol=1e-5, atol=1e-5)
        if t == 20:  # restart both
            tf_state = tf_agg.reset_state(tf_state)
            state = ours.empty(d)


@pytest.mark.parametrize("mechanism", ["tree_aggregation", "tree_adaptive"])
def test_parity_with_tffs_tree_factories_with_noise_off(mechanism):
    """Aggregates equal TFF's factory round by round; under tree_adaptive the
    clip and its estimate follow TFF's too, the clip moving only at restarts
    (here after round 3, then every 5)."""
    import tensorflow_federated as tff

    d, k, rounds = 30, 6, 14
    spec = tff.types.TensorType(np.float32, [d])
    import tensorflow as tf

    specs = tf.TensorSpec([d], tf.float32)
    if mechanism == "tree_aggregation":
        factory = tff.aggregators.DifferentiallyPrivateFactory.tree_aggregation(
            noise_multiplier=0.0, clients_per_round=float(k), l2_norm_clip=0.3,
            record_specs=specs)
        dp = DPConfig(mechanism=mechanism, noise_multiplier=0.0, l2_norm_clip=0.3)
        ours = TreeAggregator(dp, k, rounds, Restarts(None), adaptive=False)
    else:
        factory = tff.aggregators.DifferentiallyPrivateFactory.tree_adaptive(
            noise_multiplier=0.0, clients_per_round=float(k), record_specs=specs,
            restart_warmup=3, restart_frequency=5, clipped_count_stddev=0.0)
        dp = DPConfig(mechanism=mechanism, noise_multiplier=0.0, clipped_count_stddev=0.0,
                      restart_every=5, restart_warmup=3)
        ours = TreeAggregator(dp, k, rounds, Restarts(5, 3), adaptive=True)
    process = factory.create(spec)
    tff_state = process.initialize()
    state = ours.initial_state()
    rng = np.random.default_rng(0)
    clips_tff, clips_ours, estimates_tff, estimates_ours = [], [], [], []
    for _ in range(rounds):
        updates = _client_updates(rng, k, d)
        out = process.next(tff_state, updates)
        tff_state = out.state
        result, state, _ = _aggregate(ours, state, updates, np.random.default_rng(1))
        np.testing.assert_allclose(result, np.asarray(out.result), rtol=1e-5, atol=1e-7)
        if mechanism == "tree_adaptive":
            metrics = out.measurements["dp_query_metrics"]
            clips_tff.append(float(metrics["current_clip"]))
            estimates_tff.append(float(metrics["estimate_clip"]))
            clips_ours.append(ours.current_clip(state))
            estimates_ours.append(float(state["estimate"]))
    if mechanism == "tree_adaptive":
        np.testing.assert_allclose(clips_ours, clips_tff, rtol=1e-6)
        np.testing.assert_allclose(estimates_ours, estimates_tff, rtol=1e-6)
        changes = [i + 1 for i in range(1, rounds) if clips_ours[i] != clips_ours[i - 1]]
        assert changes == [3, 8, 13]  # adopted at the restarts only
        assert max(estimates_ours) / min(estimates_ours) > 1.5  # the estimate really moved


def _prefix_noise(efficient: bool, steps: int, d: int, sigma: float) -> np.ndarray:
    """[steps, d]: the noise of each prefix sum of one run of the aggregator."""
    agg = TreeAggregator(DPConfig(mechanism="tree_aggregation", noise_multiplier=sigma,
                                  l2_norm_clip=1.0, tree_efficient=efficient),
                         1, steps, Restarts(None), adaptive=False)
    state, released, out = agg.initial_state(), np.zeros(d), []
    rng = np.random.default_rng(7)
    for _ in range(steps):
        res, state, m = agg.finalize(state, agg.zero_partial(d), 1, rng)
        released = released + res.astype(np.float64)
        out.append(released.copy())
    return np.asarray(out)


def test_plain_tree_prefix_noise_has_one_node_per_binary_digit():
    """Plain tree: the noise of the prefix sum after t rounds is the sum of
    popcount(t) nodes of variance sigma^2 (Dwork et al. 2010); within 5 sigma of
    the variance estimate over 20,000 coordinates; mean zero."""
    d, steps, sigma = 20000, 12, 0.7
    prefix = _prefix_noise(False, steps, d, sigma)
    for t in range(1, steps + 1):
        expected = bin(t).count("1") * sigma ** 2
        var = prefix[t - 1].var()
        assert abs(var - expected) <= 5 * expected * math.sqrt(2 / d)
        assert abs(prefix[t - 1].mean()) <= 5 * math.sqrt(expected / d)


def test_efficient_tree_prefix_noise_variance_equals_tf_privacys_coefficients():
    """Efficient tree: the variance of each prefix noise is sigma^2 times the
    squared norm of its coefficients on the node draws, as TF Privacy's
    EfficientTreeAggregator combines them (one-hot draws give the coefficients);
    below the plain tree's from the third round on."""
    from tensorflow_privacy.privacy.dp_query import tree_aggregation

    steps, d, sigma = 12, 20000, 0.7
    eye = np.eye(64, dtype=np.float32)
    tf_agg = tree_aggregation.EfficientTreeAggregator(_TableGenerator(eye).gen)
    st = tf_agg.init_state()
    prefix = _prefix_noise(True, steps, d, sigma)
    for t in range(1, steps + 1):
        coeffs, st = tf_agg.get_cumsum_and_update(st)
        expected = float(np.sum(np.square(np.asarray(coeffs, np.float64)))) * sigma ** 2
        var = prefix[t - 1].var()
        assert abs(var - expected) <= 5 * expected * math.sqrt(2 / d)
        if t >= 3:
            assert expected < bin(t).count("1") * sigma ** 2 or bin(t).count("1") == 1


def test_restarts_follow_tf_privacys_periodic_indicator():
    assert [r for r in range(1, 20) if Restarts(5, 3).after(r)] == [3, 8, 13, 18]
    assert [r for r in range(1, 12) if Restarts(4).after(r)] == [4, 8]
    assert tree_step_counts(10, Restarts(4)) == [4, 4, 2]
    assert tree_step_counts(7, Restarts(None)) == [7]


def _cfg(**kw) -> SimConfig:
    base = dict(clients=100, clients_per_round=10, rounds=25,
                sampling=SamplingConfig(scheme="epochs"), server=ServerConfig(weighting="uniform"),
                dp=DPConfig(mechanism="tree_aggregation", noise_multiplier=1.3))
    base.update(kw)
    return SimConfig(**base)


def _direct_epsilon(rdp: np.ndarray, delta: float) -> float:
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)
    return float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])


@pytest.mark.parametrize("rounds", [7, 10, 25])
def test_tree_epsilon_over_epochs_equals_a_direct_computation(rounds):
    """sampling=epochs, 100 clients at 10 per round: 10 rounds an epoch, a tree
    restarted each epoch. The run's epsilon is that of k = ceil(rounds / 10)
    trees of ceil(log2(T + 1)) levels each (T: the longest tree's rounds):
    RDP k * alpha * depth / (2 z^2), computed here from the formula (Kairouz et
    al., appendix D), and as dp-accounting composes its tree events."""
    cfg = _cfg(rounds=rounds)
    acct = build_accountant(cfg)
    event = acct.round_event(dp_accounting.GaussianDpEvent(1.3))
    for _ in range(rounds):
        acct.record(event)
    k, longest = math.ceil(rounds / 10), min(rounds, 10)
    depth = math.ceil(math.log2(longest + 1))
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)
    direct = _direct_epsilon(k * orders * depth / (2 * 1.3 ** 2), acct.delta)
    assert acct.epsilon() == pytest.approx(direct, rel=1e-12)
    dpa = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    dpa.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(1.3, [longest]), k)
    assert acct.epsilon() == pytest.approx(dpa.get_epsilon(acct.delta), rel=1e-12)
    assert acct.relation.name == "REPLACE_SPECIAL"


def test_tree_epsilon_under_min_sep_counts_one_tree_per_participation():
    """sampling=min_sep with b = 4 and trees of 4 rounds: a client is in one round
    of at most ceil(rounds / 4) trees."""
    cfg = _cfg(rounds=18, sampling=SamplingConfig(scheme="min_sep", min_sep=4),
               dp=DPConfig(mechanism="tree_adaptive", noise_multiplier=0.8, restart_every=4))
    acct = build_accountant(cfg)
    from fedsim.privacy.mechanisms.base import resolve_mechanism

    event = acct.round_event(resolve_mechanism("tree_adaptive").round_event(cfg.dp, 10))
    for _ in range(18):
        acct.record(event)
    orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)
    direct = _direct_epsilon(5 * orders * math.ceil(math.log2(5)) / (2 * 0.8 ** 2), acct.delta)
    assert acct.epsilon() == pytest.approx(direct, rel=1e-12)


def test_tree_calibration_spends_the_target():
    from fedsim.privacy.accounting import calibrate

    cfg = _cfg(rounds=30, dp=DPConfig(mechanism="tree_aggregation", target_epsilon=4.0))
    dp = calibrate(cfg)
    acct = build_accountant(SimConfig(**{**cfg.__dict__, "dp": dp}))
    for _ in range(30):
        acct.record(acct.round_event(dp_accounting.GaussianDpEvent(dp.noise_multiplier)))
    assert 4.0 * (1 - 1e-3) <= acct.epsilon() <= 4.0


@pytest.mark.parametrize("kw, option", [
    (dict(sampling=SamplingConfig(scheme="uniform")), "sampling"),
    (dict(sampling=SamplingConfig(scheme="poisson")), "sampling"),
    (dict(dp=DPConfig(mechanism="tree_aggregation", restart_every="never")),
     "dp.restart_every"),
    (dict(dp=DPConfig(mechanism="tree_aggregation", restart_every=3)), "dp.restart_every"),
    (dict(sampling=SamplingConfig(scheme="min_sep", min_sep=4),
          dp=DPConfig(mechanism="tree_aggregation", restart_every=5)), "dp.restart_every"),
    (dict(dp=DPConfig(mechanism="tree_aggregation", accountant="pld")), "dp.accountant"),
])
def test_tree_mechanisms_refuse_schedules_their_accounting_does_not_cover(kw, option):
    from fedsim.privacy.mechanisms.base import resolve_mechanism

    cfg = _cfg(**kw)
    with pytest.raises(ConfigError) as err:
        resolve_mechanism(cfg.dp.mechanism).check(cfg)
    assert err.value.option == option

"""Robust aggregators (median, trimmed mean, Krum, Multi-Krum, Bulyan) against
direct numpy computations written here, over any split of the clients across
workers; their composition refusals; one short run through the real engine."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedsim.aggregation.base import MeanAggregator
from fedsim.aggregation.bulyan import BulyanAggregator
from fedsim.aggregation.krum import KrumAggregator
from fedsim.aggregation.median import MedianAggregator
from fedsim.aggregation.robust import RobustAggregator
from fedsim.aggregation.trimmed_mean import TrimmedMeanAggregator
from fedsim.config import (
    AggregatorConfig,
    AuditConfig,
    DPConfig,
    SecAggConfig,
    ServerConfig,
    SimConfig,
)
from fedsim.errors import ConfigError

# -- the oracles: direct numpy computations of each rule -----------------------------------


def oracle_trim_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """scipy's trim_mean if scipy is there, else sort and cut by hand."""
    try:
        from scipy.stats import trim_mean
    except ImportError:  # pragma: no cover - scipy is a dependency of scikit-learn
        n = stack.shape[0]
        cut = int(beta * n)
        return np.sort(stack, axis=0)[cut:n - cut].mean(axis=0)
    return trim_mean(stack, beta, axis=0)


def oracle_krum_scores(stack: np.ndarray, f: int) -> np.ndarray:
    """Brute force: every pair's squared distance, the n - f - 2 nearest others."""
    n = len(stack)
    k = max(n - f - 2, 1)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((stack[i] - stack[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:k]))
    return np.array(scores)


def oracle_multi_krum(stack: np.ndarray, f: int, m: int) -> np.ndarray:
    scores = oracle_krum_scores(stack, f)
    best = sorted(range(len(stack)), key=lambda i: scores[i])[:m]
    return stack[best].mean(axis=0)


def oracle_bulyan(stack: np.ndarray, f: int) -> np.ndarray:
    """El Mhamdi et al. 2018: theta = n - 2f picks of Krum over the remaining
    updates, then per coordinate the mean of the theta - 2f values closest to
    the selected updates' median of that coordinate."""
    remaining = list(range(len(stack)))
    chosen = []
    while len(chosen) < len(stack) - 2 * f:
        scores = oracle_krum_scores(stack[remaining], f)
        chosen.append(remaining.pop(int(np.argmin(scores))))
    sel = stack[chosen]
    beta = len(chosen) - 2 * f
    out = np.empty(stack.shape[1])
    for c in range(stack.shape[1]):
        col = sel[:, c]
        med = np.median(col)
        closest = sorted(col, key=lambda v: abs(v - med))[:beta]
        out[c] = np.mean(closest)
    return out


def by_bytes(stack: np.ndarray) -> np.ndarray:
    """The rows in the order of their bytes: Krum's ties (e.g. two mutual nearest
    neighbours when one neighbour counts) go to the first row in this order."""
    return np.stack(sorted(stack, key=lambda row: row.tobytes()))


def oracle(kind: str, stack: np.ndarray, *, beta: float = 0.2, f: int = 2,
           m: int | None = None) -> np.ndarray:
    stack = by_bytes(stack)
    if kind == "median":
        return np.median(stack, axis=0)
    if kind == "trimmed_mean":
        return oracle_trim_mean(stack, beta)
    if kind == "krum":
        return oracle_multi_krum(stack, f, 1)
    if kind == "multi_krum":
        return oracle_multi_krum(stack, f, m if m is not None else len(stack) - f)
    assert kind == "bulyan"
    return oracle_bulyan(stack, f)


def make(kind: str, *, beta: float = 0.2, f: int = 2, m: int | None = None,
         clip: float | None = None) -> RobustAggregator:
    if kind == "median":
        return MedianAggregator(clip=clip)
    if kind == "trimmed_mean":
        return TrimmedMeanAggregator(beta, clip=clip)
    if kind == "krum":
        return KrumAggregator(f, clip=clip)
    if kind == "multi_krum":
        return KrumAggregator(f, m, multi=True, clip=clip)
    return BulyanAggregator(f, clip=clip)


KINDS = ["median", "trimmed_mean", "krum", "multi_krum", "bulyan"]


def updates(n: int, d: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=d).astype(np.float32) for _ in range(n)]


def aggregate(agg, deltas, shards, size=None):
    """The round as the engine runs it: each shard's clients accumulated in a
    worker's partial, the partials merged on the server into its zero partial."""
    size = size if size is not None else deltas[0].size
    parts = []
    for shard in shards:
        p = agg.zero_partial(size)
        for i in shard:
            p = agg.accumulate({}, p, deltas[i], 10 + i)  # weights are ignored
        parts.append(p)
    merged = agg.zero_partial(size)
    for p in parts:
        merged = agg.merge(merged, p)
    return agg.finalize({}, merged, len(deltas), np.random.default_rng(0))


def groupings(n: int):
    """Several ways of splitting n clients over workers, in different orders."""
    rng = np.random.default_rng(7)
    perm = [int(i) for i in rng.permutation(n)]
    return [[list(range(n))],
            [[0, 1, 2], [3], list(range(4, n))],
            [list(range(n - 1, 4, -1)), [], [4, 2], [3, 1, 0]],
            [[i] for i in perm]]


# -- each rule against its oracle ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_equals_numpy_over_any_split(kind):
    deltas = updates(11, 13)
    stack = np.stack(deltas).astype(np.float64)
    expected = oracle(kind, stack)
    results = []
    for shards in groupings(11):
        result, state, m = aggregate(make(kind), deltas, shards)
        assert result.dtype == np.float32 and result.shape == (13,) and state == {}
        assert m["zeroed"] == 0 and "clipped_fraction" not in m
        results.append(result)
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    for r in results[1:]:  # bit for bit, whatever the split
        np.testing.assert_array_equal(r, results[0])


def test_krum_picks_the_update_of_lowest_brute_force_score():
    deltas = updates(9, 6, seed=3)
    stack = np.stack(deltas).astype(np.float64)
    scores = oracle_krum_scores(stack, 2)  # 5 neighbours each: no ties
    result, _, m = aggregate(KrumAggregator(2), deltas, [[0, 1, 2, 3], [4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(result, deltas[int(np.argmin(scores))])
    assert m["robust_f"] == 2 and m["robust_selected"] == 1


@pytest.mark.parametrize("select", [None, 1, 3, 6])
def test_multi_krum_averages_the_select_lowest_scores(select):
    deltas = updates(10, 8, seed=4)
    stack = np.stack(deltas).astype(np.float64)
    m_want = select if select is not None else 10 - 2
    result, _, m = aggregate(KrumAggregator(2, select, multi=True), deltas, groupings(10)[1])
    np.testing.assert_allclose(result, oracle_multi_krum(by_bytes(stack), 2, m_want), rtol=1e-6,
                               atol=1e-7)
    assert m["robust_selected"] == m_want


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.45])
def test_trimmed_mean_cuts_floor_beta_n_from_each_end(beta):
    deltas = updates(12, 7, seed=5)
    stack = np.stack(deltas).astype(np.float64)
    result, _, m = aggregate(TrimmedMeanAggregator(beta), deltas, groupings(12)[2])
    np.testing.assert_allclose(result, oracle_trim_mean(stack, beta), rtol=1e-6, atol=1e-7)
    assert m["robust_trimmed"] == int(beta * 12)


def test_bulyan_reports_theta_and_beta():
    result, _, m = aggregate(BulyanAggregator(2), updates(12, 5), [range(6), range(6, 12)])
    assert m == {"zeroed": 0, "robust_f": 2, "robust_selected": 8, "robust_kept": 4}


# -- clipping, non-finite updates, too few reporters ---------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_clipping_applies_to_each_update_before_the_rule(kind):
    deltas = updates(11, 13, seed=1)
    deltas[3] = deltas[3] * 0.01  # one update inside the ball
    clip = 0.5

    def clipped(d):
        d = d.astype(np.float64)
        n = np.linalg.norm(d)
        return d * min(1.0, clip / n)

    stack = np.stack([clipped(d) for d in deltas])
    result, _, m = aggregate(make(kind, clip=clip), deltas, groupings(11)[3])
    np.testing.assert_allclose(result, oracle(kind, stack), rtol=1e-6, atol=1e-7)
    assert m["clip"] == clip and m["clipped_fraction"] == pytest.approx(10 / 11)
    assert np.linalg.norm(result) <= clip * (1 + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_finite_update_is_replaced_by_zeros_and_counted(kind):
    deltas = updates(11, 13, seed=2)
    deltas[5] = deltas[5].copy()
    deltas[5][2] = np.nan
    deltas[8] = np.full(13, np.inf, np.float32)
    stack = np.stack(deltas).astype(np.float64)
    stack[[5, 8]] = 0.0
    result, _, m = aggregate(make(kind), deltas, groupings(11)[1])
    assert np.isfinite(result).all() and m["zeroed"] == 2
    np.testing.assert_allclose(result, oracle(kind, stack), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,f,n,f_used", [("krum", 3, 6, 1), ("multi_krum", 3, 5, 1),
                                             ("krum", 2, 2, 0), ("bulyan", 2, 8, 1),
                                             ("bulyan", 1, 5, 0), ("bulyan", 3, 1, 0)])
def test_fewer_reporters_than_f_needs_use_the_largest_f_they_allow(kind, f, n, f_used):
    """Dropouts left n reporters: Krum needs n > 2f + 2, Bulyan n >= 4f + 3."""
    deltas = updates(n, 9, seed=n)
    stack = np.stack(deltas).astype(np.float64)
    result, _, m = aggregate(make(kind, f=f), deltas, [range(n)])
    assert m["robust_f"] == f_used
    if kind == "bulyan" and n < 3:  # f' = 0 selects everything: the mean of all
        np.testing.assert_allclose(result, stack.mean(axis=0), rtol=1e-6)
    else:
        np.testing.assert_allclose(result, oracle(kind, stack, f=f_used), rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_a_round_without_reporters_gives_zeros(kind):
    agg = make(kind)
    result, _, m = agg.finalize({}, agg.zero_partial(4), 5, np.random.default_rng(0))
    np.testing.assert_array_equal(result, np.zeros(4, np.float32))
    assert m["zeroed"] == 0


def test_records_are_copies_and_inputs_are_not_mutated():
    agg = MedianAggregator(clip=0.1)
    delta = np.ones(4, np.float64)
    zero = agg.zero_partial(4)
    p = agg.accumulate({}, zero, delta, 3)
    delta[0] = 99.0
    assert zero.total.shape == (0, 4) and zero.count == 0
    np.testing.assert_allclose(p.total, np.full((1, 4), 0.05))
    q = agg.merge(p, agg.record({}, np.ones(4), 1))
    assert p.total.shape == (1, 4) and q.total.shape == (2, 4) and q.count == 2
    assert q.weight == 2.0 and q.stats == {"zeroed": 0.0, "clipped": 2.0}
    assert not agg.supports_secure_sum and agg.current_clip({}) == 0.1


# -- robustness ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_huge_updates_do_not_move_the_robust_aggregate(kind):
    rng = np.random.default_rng(11)
    honest_center = np.linspace(-1, 1, 20)
    honest = [honest_center + 0.1 * rng.normal(size=20) for _ in range(12)]
    evil = [1e6 * v / np.linalg.norm(v) for v in rng.normal(size=(3, 20))]
    deltas = [d.astype(np.float32) for d in honest + evil]
    shards = [range(0, 15, 2), range(1, 15, 2)]
    mean, _, _ = aggregate(MeanAggregator("uniform"), deltas, shards)
    assert np.linalg.norm(mean - honest_center) > 1e4  # the mean is destroyed
    # 3 attackers among 15: f = 3 (Bulyan's 4f + 3 = 15), 3 cut from each end
    robust, _, _ = aggregate(make(kind, beta=0.2, f=3), deltas, shards)
    assert np.linalg.norm(robust - honest_center) < 0.5 * np.linalg.norm(honest_center)


def test_flat_stack_from_another_aggregator_is_refused():
    agg = MedianAggregator()
    with pytest.raises(ValueError, match="cannot merge partials"):
        agg.merge(agg.zero_partial(3), MeanAggregator().zero_partial(3))


# -- config ---------------------------------------------------------------------------------


def robust_config(kind="median", **kw) -> SimConfig:
    agg = {"krum": dict(byzantine=1), "multi_krum": dict(byzantine=1),
           "bulyan": dict(byzantine=1), "trimmed_mean": dict(beta=0.1)}.get(kind, {})
    agg.update(kw.pop("agg", {}))
    base = dict(clients=50, clients_per_round=10, aggregator=AggregatorConfig(kind=kind, **agg),
                server=ServerConfig(weighting="uniform"))
    base.update(kw)
    return SimConfig(**base)


@pytest.mark.parametrize("kind", KINDS)
def test_build_aggregator_builds_each_kind_from_the_config(kind):
    from fedsim.engine.parts import build_aggregator, build_robust_aggregator

    cfg = robust_config(kind, agg=dict(clip=2.0))
    agg = build_aggregator(cfg)
    assert isinstance(agg, RobustAggregator) and agg.kind == kind and agg.clip == 2.0
    assert type(build_robust_aggregator(cfg)) is type(agg)


@pytest.mark.parametrize("kw,match", [
    (dict(secagg=SecAggConfig(protocol="secagg")),
     r"^secagg\.protocol=secagg: allowed is none with aggregator\.kind=median \(secure "
     r"aggregation reveals only the sum"),
    (dict(dp=DPConfig(mechanism="gaussian")),
     r"^dp\.mechanism=gaussian: allowed is none with aggregator\.kind=median \(no "
     r"sensitivity analysis"),
    (dict(server=ServerConfig(weighting="num_examples")),
     r"^server\.weighting=num_examples: allowed is uniform with aggregator\.kind=median"),
    (dict(audit=AuditConfig(kind="canary")),
     r"^audit\.kind=canary: allowed is none with aggregator\.kind=median \(canaries"),
])
def test_compositions_that_cannot_work_are_refused_in_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        robust_config("median", **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind,agg,kw,match", [
    ("krum", dict(byzantine=4), {}, r"^aggregator\.byzantine=4: allowed is an integer in "
     r"\[0, 3\] with aggregator\.kind=krum and clients_per_round=10"),
    ("multi_krum", dict(byzantine=1, select=10), {}, r"^aggregator\.select=10: allowed is "
     r"an integer in \[1, clients_per_round - byzantine = 9\]"),
    ("bulyan", dict(byzantine=2), {}, r"^aggregator\.byzantine=2: allowed is an integer in "
     r"\[0, 1\] with aggregator\.kind=bulyan"),
    ("krum", dict(byzantine=0), dict(clients_per_round=2),
     r"^clients_per_round=2: allowed is an integer >= 3 with aggregator\.kind=krum"),
])
def test_too_many_byzantine_for_the_cohort_is_refused(kind, agg, kw, match):
    with pytest.raises(ConfigError, match=match):
        robust_config(kind, agg=agg, **kw)


@pytest.mark.parametrize("args,match", [
    (dict(kind="trimmed_mean", beta=0.5), r"^aggregator\.beta=0\.5: allowed is a fraction "
     r"in \[0, 0\.5\)"),
    (dict(kind="trimmed_mean"), r"^aggregator\.beta=None: allowed is a fraction"),
    (dict(kind="median", beta=0.1), r"^aggregator\.beta=0\.1: allowed is null with "
     r"aggregator\.kind=median \(an option of trimmed_mean\)"),
    (dict(kind="krum"), r"^aggregator\.byzantine=None: allowed is an integer >= 0"),
    (dict(kind="bulyan", byzantine=-1), r"^aggregator\.byzantine=-1: allowed is an integer"),
    (dict(kind="krum", byzantine=1, select=2), r"^aggregator\.select=2: allowed is null "
     r"with aggregator\.kind=krum \(an option of multi_krum\)"),
    (dict(kind="multi_krum", byzantine=1, select=0), r"^aggregator\.select=0: allowed is an "
     r"integer >= 1"),
    (dict(kind="median", clip=0.0), r"^aggregator\.clip=0\.0: allowed is a finite number > 0"),
    (dict(kind="native", clip=1.0), r"^aggregator\.clip=1\.0: allowed is null with "
     r"aggregator\.kind=native"),
    (dict(kind="geomedian"), r"^aggregator\.kind=geomedian: allowed is one of native, tff, "
     r"median, trimmed_mean, krum, multi_krum, bulyan"),
])
def test_bad_robust_options_are_refused_in_one_line(args, match):
    with pytest.raises(ConfigError, match=match):
        AggregatorConfig(**args)


def test_every_kind_with_its_options_is_accepted():
    for kind, clip in itertools.product(KINDS, (None, 1.5)):
        cfg = robust_config(kind, agg=dict(clip=clip))
        assert cfg.aggregator.robust and cfg.aggregator.clip == clip


# -- one short run through the real engine --------------------------------------------------


def test_median_run_learns_and_the_summary_records_the_kind(warm_actors):
    from helpers import small_config

    from fedsim.config import ClientConfig, DataConfig
    from fedsim.simulation import run_simulation

    cfg = small_config(rounds=2, clients_per_round=8, local_epochs=5,
                       data=DataConfig(partition="iid"), client=ClientConfig(learning_rate=0.1),
                       aggregator=AggregatorConfig(kind="median"),
                       server=ServerConfig(weighting="uniform"))
    result = run_simulation(cfg, actors=warm_actors)
    assert result.summary["config"]["aggregator"]["kind"] == "median"
    assert [r["clients"] for r in result.metrics] == [8, 8]
    assert all(r["zeroed"] == 0 and r["update_norm"] > 0 for r in result.metrics)
    assert result.metrics[-1]["eval_accuracy"] > 0.4  # chance is 0.1

"""The participation schemes (``sampling=uniform|poisson|epochs|min_sep``): their
guarantees, their determinism per (seed, round), their config checks and the
helpers the accountant uses (pure numpy and Hydra's compose, no Ray)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from fedsim.cohort.sampling import (
    EPOCH_KEY,
    GROUP_KEY,
    CohortSampler,
    epoch_step_counts,
    max_participations,
    min_sep_groups,
    rounds_per_epoch,
    sample_clients,
    sample_round,
)
from fedsim.config import (
    DPConfig,
    FaultsConfig,
    SamplingConfig,
    ServerConfig,
    SimConfig,
    saved_sampling_scheme,
)
from fedsim.errors import ConfigError
from fedsim.rng import STREAM_SAMPLING, stream

EPOCHS = SamplingConfig("epochs")


def dp_config(accountant: str = "rdp", **kw) -> SimConfig:
    return SimConfig(dp=DPConfig(mechanism="gaussian", accountant=accountant),
                     server=ServerConfig(weighting="uniform"), **kw)


def cohorts(sampling: SamplingConfig, population: int, per_round: int, rounds: int,
            seed: int = 0) -> list[np.ndarray]:
    return [sample_round(sampling, population, per_round, seed, t) for t in range(1, rounds + 1)]


def counts(cohort_list: list[np.ndarray], population: int) -> np.ndarray:
    return np.bincount(np.concatenate(cohort_list), minlength=population)


# --------------------------------------------------------------------------- epochs

def test_epochs_deal_each_client_at_most_once_per_epoch_and_leftovers_sit_out():
    population, per_round = 103, 10
    rpe = rounds_per_epoch(population, per_round)
    assert rpe == 10
    epochs = 5
    rounds = cohorts(EPOCHS, population, per_round, epochs * rpe + 4, seed=3)  # + a partial one
    leftovers = []
    for e in range(epochs + 1):
        epoch = rounds[e * rpe:(e + 1) * rpe]
        for c in epoch:  # exact size, sorted distinct int64 ids in range
            assert c.dtype == np.int64 and c.size == per_round
            assert np.all(np.diff(c) > 0) and 0 <= c[0] and c[-1] < population
        ids = np.concatenate(epoch)
        assert np.unique(ids).size == ids.size  # at most once in the epoch
        if len(epoch) == rpe:
            left = np.setdiff1d(np.arange(population), ids)
            assert left.size == population % per_round  # the 3 left over sit it out
            leftovers.append(tuple(left))
    assert len(set(leftovers)) > 1  # a new permutation each epoch: other clients sit out


def test_epochs_slices_the_epoch_permutation_of_its_own_stream():
    population, per_round, seed = 103, 10, 7
    for t in (1, 10, 11, 37):
        e, r = divmod(t - 1, 10)
        perm = stream(seed, STREAM_SAMPLING, EPOCH_KEY, e).permutation(population)
        expected = np.sort(perm[r * per_round:(r + 1) * per_round])
        np.testing.assert_array_equal(sample_round(EPOCHS, population, per_round, seed, t),
                                      expected)


def test_one_epoch_of_the_whole_population_when_per_round_equals_it():
    assert rounds_per_epoch(10, 10) == 1
    for c in cohorts(EPOCHS, 10, 10, 3):
        np.testing.assert_array_equal(c, np.arange(10))


# --------------------------------------------------------------------------- min_sep

def test_min_sep_groups_partition_the_population_in_near_equal_sizes():
    groups = min_sep_groups(103, 4, seed=1)
    assert [g.size for g in groups] == [26, 26, 26, 25]
    assert all(g.dtype == np.int64 and np.all(np.diff(g) > 0) for g in groups)
    np.testing.assert_array_equal(np.sort(np.concatenate(groups)), np.arange(103))
    perm = stream(1, STREAM_SAMPLING, GROUP_KEY, 4).permutation(103)
    np.testing.assert_array_equal(groups[2], np.sort(perm[2::4]))
    # the same groups every call (seeded), other groups under another seed
    assert all(np.array_equal(a, b) for a, b in zip(groups, min_sep_groups(103, 4, seed=1)))
    assert not np.array_equal(groups[0], min_sep_groups(103, 4, seed=2)[0])


@pytest.mark.parametrize("population,per_round,b", [(103, 10, 4), (100, 25, 4), (50, 5, 7),
                                                    (20, 20, 1)])
def test_min_sep_a_client_takes_part_at_most_once_every_b_rounds(population, per_round, b):
    sampling = SamplingConfig("min_sep", b)
    rounds = cohorts(sampling, population, per_round, 12 * b + 3, seed=5)
    groups = min_sep_groups(population, b, seed=5)
    last: dict[int, int] = {}
    for t, c in enumerate(rounds, start=1):
        assert c.dtype == np.int64 and c.size == per_round and np.unique(c).size == per_round
        assert np.isin(c, groups[(t - 1) % b]).all()  # drawn from round t's group
        for cid in c.tolist():
            assert t - last.get(cid, -math.inf) >= b
            last[cid] = t
    # within a group the draws vary from round to round (unless a round takes it all)
    if per_round < population // b:
        assert not np.array_equal(rounds[0], rounds[b])


def test_min_sep_draws_from_the_rounds_own_stream():
    population, per_round, b, seed, t = 103, 10, 4, 9, 6
    group = min_sep_groups(population, b, seed)[(t - 1) % b]
    expected = np.sort(stream(seed, STREAM_SAMPLING, t).choice(group, size=per_round,
                                                               replace=False))
    np.testing.assert_array_equal(
        sample_round(SamplingConfig("min_sep", b), population, per_round, seed, t), expected)


# --------------------------------------------------------------------------- every scheme

SCHEMES = [SamplingConfig("uniform"), SamplingConfig("poisson"), EPOCHS,
           SamplingConfig("min_sep", 3)]


@pytest.mark.parametrize("sampling", SCHEMES, ids=lambda s: s.scheme)
def test_a_rounds_cohort_depends_only_on_seed_and_round(sampling):
    """Stateless: round t's cohort is the same whatever ran before (a resumed
    run draws in another order, from another process), and another seed differs."""
    population, per_round, n = 103, 10, 35
    in_order = cohorts(sampling, population, per_round, n, seed=4)
    order = list(range(1, n + 1))
    random.Random(0).shuffle(order)
    shuffled = {t: sample_round(sampling, population, per_round, 4, t) for t in order}
    for t in range(1, n + 1):
        np.testing.assert_array_equal(in_order[t - 1], shuffled[t])
    resumed = [sample_round(sampling, population, per_round, 4, t) for t in range(20, n + 1)]
    assert all(np.array_equal(a, b) for a, b in zip(in_order[19:], resumed))
    other = cohorts(sampling, population, per_round, n, seed=5)
    assert any(not np.array_equal(a, b) for a, b in zip(in_order, other))


@pytest.mark.parametrize("sampling", [SamplingConfig("uniform"), SamplingConfig("poisson"),
                                      EPOCHS, SamplingConfig("min_sep", 3)])
def test_the_servers_caching_sampler_draws_sample_rounds_cohorts_in_any_order(sampling):
    """CohortSampler (the server's: an epoch's permutation and min_sep's groups
    computed once) gives exactly sample_round's cohorts, rounds asked in order,
    shuffled (across epoch boundaries: 10 rounds per epoch here) or repeated."""
    population, per_round, n = 103, 10, 35
    sampler = CohortSampler(sampling, population, per_round, 4)
    order = list(range(1, n + 1)) + [3, 3, 27, 1]
    random.Random(1).shuffle(order)
    for t in list(range(1, n + 1)) + order:
        np.testing.assert_array_equal(sampler(t), sample_round(sampling, population, per_round,
                                                               4, t))
    if sampling.scheme in ("epochs", "min_sep"):  # (as sample_round)
        with pytest.raises(ValueError, match="numbered from 1"):
            sampler(0)


@pytest.mark.parametrize("method", ["uniform", "poisson"])
def test_uniform_and_poisson_draw_exactly_as_before(method):
    """sample_round is sample_clients with the round's stream: the cohorts (and
    so the golden fingerprints) of existing runs are unchanged."""
    for t in (1, 2, 50):
        np.testing.assert_array_equal(
            sample_round(SamplingConfig(method), 100, 10, 3, t),
            sample_clients(100, 10, method, stream(3, STREAM_SAMPLING, t)))


def test_rounds_are_numbered_from_one_and_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="numbered from 1"):
        sample_round(EPOCHS, 103, 10, 0, 0)
    with pytest.raises(ValueError, match="numbered from 1"):
        sample_round(SamplingConfig("min_sep", 2), 103, 10, 0, 0)
    with pytest.raises(ValueError, match="uniform or poisson"):
        sample_clients(10, 2, "epochs", stream(0, STREAM_SAMPLING, 1))
    bogus = SamplingConfig()
    bogus.scheme = "cyclic"  # (past validation)
    with pytest.raises(ValueError, match="sampling must be one of"):
        sample_round(bogus, 10, 2, 0, 1)


# --------------------------------------------------------------------------- helpers

@pytest.mark.parametrize("scheme,population,per_round,b,tight", [
    ("epochs", 103, 10, None, False),  # leftovers: some clients may sit out an epoch
    ("epochs", 100, 10, None, True),   # every client in every epoch
    ("epochs", 30, 7, None, False),
    ("min_sep", 103, 10, 4, False),
    ("min_sep", 100, 25, 4, True),     # each round takes its whole group
    ("min_sep", 40, 3, 5, False),
])
def test_max_participations_bounds_a_brute_force_count(scheme, population, per_round, b, tight):
    sampling = SamplingConfig(scheme, b)
    for seed in (0, 1):
        rounds = cohorts(sampling, population, per_round, 47, seed)
        for n in (0, 1, 2, 9, 10, 11, 20, 33, 47):
            bound = max_participations(scheme, n, population, per_round, b)
            most = int(counts(rounds[:n], population).max()) if n else 0
            assert most <= bound, (n, most, bound)
            if tight:
                assert most == bound, (n, most, bound)


def test_max_participations_formulas():
    assert max_participations("epochs", 25, 103, 10) == 3  # epochs touched: ceil(25 / 10)
    assert max_participations("epochs", 30, 103, 10) == 3
    assert max_participations("epochs", 0, 103, 10) == 0
    assert max_participations("min_sep", 9, 103, 10, 4) == 3  # rounds 1, 5, 9
    assert max_participations("min_sep", 8, 103, 10, 4) == 2
    assert max_participations("uniform", 25, 103, 10) is None  # any round
    assert max_participations("poisson", 25, 103, 10) is None
    with pytest.raises(ValueError, match="min_sep >= 1"):
        max_participations("min_sep", 9, 103, 10)
    with pytest.raises(ValueError, match="sampling must be one of"):
        max_participations("cyclic", 9, 103, 10)


def test_rounds_per_epoch_and_epoch_step_counts():
    assert rounds_per_epoch(103, 10) == 10
    assert rounds_per_epoch(10, 10) == 1
    assert rounds_per_epoch(19, 10) == 1
    with pytest.raises(ValueError, match="per_round"):
        rounds_per_epoch(10, 11)
    assert epoch_step_counts(25, 10) == [10, 10, 5]
    assert epoch_step_counts(20, 10) == [10, 10]
    assert epoch_step_counts(3, 10) == [3]
    assert epoch_step_counts(0, 10) == []
    with pytest.raises(ValueError, match="rounds_per_epoch"):
        epoch_step_counts(5, 0)


def test_epoch_step_counts_match_the_epochs_the_cohorts_were_dealt_from():
    population, per_round, n = 103, 10, 34
    rpe = rounds_per_epoch(population, per_round)
    rounds = cohorts(EPOCHS, population, per_round, n, seed=2)
    steps = epoch_step_counts(n, rpe)
    assert sum(steps) == n and len(steps) == max_participations("epochs", n, population,
                                                                 per_round)
    start = 0
    for k in steps:  # each epoch's rounds are disjoint cohorts
        ids = np.concatenate(rounds[start:start + k])
        assert np.unique(ids).size == k * per_round
        start += k


# --------------------------------------------------------------------------- config

def test_a_scheme_name_is_short_for_its_config():
    from fedsim.cohort.sampling import SCHEMES as DRAWN
    from fedsim.config import SAMPLING

    assert SAMPLING == DRAWN  # the config allows exactly the schemes sample_round draws
    assert SimConfig(sampling="poisson").sampling == SamplingConfig("poisson", None)
    assert SimConfig().sampling == SamplingConfig("uniform")
    cfg = SimConfig(clients=103, clients_per_round=10, sampling=SamplingConfig("min_sep", 10))
    assert cfg.sampling.min_sep == 10
    assert dataclasses.replace(cfg, sampling="epochs").sampling == EPOCHS
    assert dataclasses.asdict(cfg)["sampling"] == {"scheme": "min_sep", "min_sep": 10}


BAD_CONFIGS = [
    (dict(sampling="cyclic"),
     "sampling.scheme=cyclic: allowed is one of uniform, poisson, epochs, min_sep"),
    (dict(sampling="min_sep"), "sampling.min_sep=None: allowed is an integer >= 1 with "
     "sampling=min_sep (a client takes part at most once every min_sep rounds)"),
    (dict(sampling=("min_sep", 0)), "sampling.min_sep=0: allowed is an integer >= 1"),
    (dict(clients=103, clients_per_round=10, sampling=("min_sep", 11)),
     "sampling.min_sep=11: allowed is an integer in [1, clients // clients_per_round = 10] "
     "with clients=103 and clients_per_round=10 (each of the min_sep groups must hold a "
     "round's cohort)"),
    (dict(sampling=("epochs", 3)), "sampling.min_sep=3: allowed is null with "
     "sampling=epochs (min_sep is the separation of sampling=min_sep)"),
    (dict(sampling=("uniform", 2)), "sampling.min_sep=2: allowed is null with "
     "sampling=uniform"),
    (dict(sampling="epochs", clients_per_round=101),
     "clients_per_round=101: allowed is an integer in [1, clients=100]"),
    (dict(sampling="epochs", faults=FaultsConfig(over_selection=0.3)),
     "faults.over_selection=0.3: allowed is 0 with sampling=epochs"),
    (dict(sampling=("min_sep", 2), faults=FaultsConfig(over_selection=0.3)),
     "faults.over_selection=0.3: allowed is 0 with sampling=min_sep"),
]


@pytest.mark.parametrize("kw,message", BAD_CONFIGS, ids=[m.split(":")[0] for _, m in BAD_CONFIGS])
def test_bad_sampling_is_one_line_naming_the_option(kw, message):
    with pytest.raises(ConfigError) as err:
        if isinstance(kw.get("sampling"), tuple):  # (a SamplingConfig checks itself)
            kw = {**kw, "sampling": SamplingConfig(*kw["sampling"])}
        SimConfig(**kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_pld_is_allowed_with_the_new_schemes_and_still_refused_with_uniform():
    for s in ("poisson", "epochs", SamplingConfig("min_sep", 2)):
        dp_config("pld", sampling=s)
    with pytest.raises(ConfigError, match="dp.accountant=pld: allowed is rdp with sampling=uniform"):
        dp_config("pld")


def test_the_command_line_names_a_scheme_and_its_options():
    from test_golden import compose

    from fedsim.cli import format_error

    assert compose([]).sampling == SamplingConfig("uniform")
    assert compose(["sampling=poisson"]).sampling == SamplingConfig("poisson")
    assert compose(["sampling=epochs"]).sampling == EPOCHS
    assert compose(["sampling=min_sep", "sampling.min_sep=4"]).sampling == SamplingConfig(
        "min_sep", 4)
    for overrides, message in [
            (["sampling=min_sep"], "sampling.min_sep=None: allowed is an integer >= 1"),
            (["sampling=min_sep", "sampling.min_sep=11"], "sampling.min_sep=11: allowed is an "
             "integer in [1, clients // clients_per_round = 10]"),
            (["sampling.min_sep=3"], "sampling.min_sep=3: allowed is null with sampling=uniform"),
            (["sampling=cyclic"], "sampling=cyclic: unknown option; allowed: epochs, min_sep, "
             "poisson, uniform")]:
        with pytest.raises(Exception) as err:
            compose(overrides)
        assert message in format_error(err.value), overrides


# --------------------------------------------------------------------------- checkpoints

def test_an_old_checkpoints_sampling_name_upgrades_to_the_config():
    from fedsim.results.checkpoint import CheckpointError, check_resumable, upgrade_config

    old = dataclasses.asdict(SimConfig(sampling="poisson"))
    old["sampling"] = "poisson"  # as checkpoints stored it before the config group
    assert upgrade_config(old)["sampling"] == {"scheme": "poisson", "min_sep": None}
    assert check_resumable(old, SimConfig(sampling="poisson")) == {}
    with pytest.raises(CheckpointError, match="privacy parameter sampling differs"):
        check_resumable(old, SimConfig(sampling="epochs"))
    assert check_resumable(old, SimConfig(sampling="epochs", resume_force=True)) == {
        "sampling": "{'scheme': 'poisson', 'min_sep': None} -> "
                    "{'scheme': 'epochs', 'min_sep': None}"}
    new = dataclasses.asdict(SimConfig(clients=103, sampling=SamplingConfig("min_sep", 4)))
    assert check_resumable(new, SimConfig(clients=103, sampling=SamplingConfig("min_sep", 4))) == {}
    with pytest.raises(CheckpointError, match="privacy parameter sampling differs"):
        check_resumable(new, SimConfig(clients=103, sampling=SamplingConfig("min_sep", 5)))


def test_the_ledger_check_reads_the_saved_scheme_in_either_form():
    from fedsim.privacy.accounting import LedgerError, check_ledger

    assert saved_sampling_scheme("uniform") == "uniform"
    assert saved_sampling_scheme({"scheme": "epochs", "min_sep": None}) == "epochs"
    assert saved_sampling_scheme(None) is None
    cfg = dp_config(sampling="poisson")
    for saved in ("uniform", {"scheme": "uniform", "min_sep": None}):
        with pytest.raises(LedgerError, match="sampling=poisson changes the neighbouring"):
            check_ledger(cfg, [], {"sampling": saved, "dp": {"accountant": "rdp"}})
    for saved in ("poisson", {"scheme": "poisson", "min_sep": None}):
        check_ledger(cfg, [], {"sampling": saved, "dp": {"accountant": "rdp"}})


def test_the_summary_describes_the_scheme():
    from fedsim.results.summary import sampling_summary

    cfg = SimConfig(clients=103, clients_per_round=10, rounds=25, sampling="epochs")
    assert sampling_summary(cfg) == {"scheme": "epochs", "min_sep": None,
                                     "rounds_per_epoch": 10, "max_participations": 3}
    assert sampling_summary(cfg, rounds=10)["max_participations"] == 1
    cfg = dataclasses.replace(cfg, sampling=SamplingConfig("min_sep", 4))
    assert sampling_summary(cfg) == {"scheme": "min_sep", "min_sep": 4, "max_participations": 7}
    assert sampling_summary(SimConfig()) == {"scheme": "uniform", "min_sep": None,
                                             "max_participations": None}

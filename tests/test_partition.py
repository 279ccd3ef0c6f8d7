"""Tests of fedsim.data.partition: validity, determinism, skew and scale."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedsim.data.partition import (
    Partition,
    _donations,
    dirichlet_partition,
    iid_partition,
    label_skew,
)
from fedsim.errors import ConfigError


@pytest.fixture(scope="module")
def digit_labels() -> np.ndarray:
    return load_digits().target.astype(np.int64)


def assert_valid(p: Partition, num_examples: int, num_clients: int) -> None:
    """Every example used exactly once, every client non-empty, indices sorted."""
    assert p.indices.dtype == np.int64 and p.offsets.dtype == np.int64
    assert p.num_clients == num_clients
    assert p.offsets.shape == (num_clients + 1,)
    sizes = p.sizes()
    assert sizes.sum() == num_examples
    assert sizes.min() >= 1
    np.testing.assert_array_equal(np.sort(p.indices), np.arange(num_examples))
    for c in (0, num_clients // 2, num_clients - 1):
        idx = p.client_indices(c)
        assert len(idx) == sizes[c]
        assert np.all(np.diff(idx) > 0)


def make_iid(labels: np.ndarray, k: int, seed: int) -> Partition:
    return iid_partition(len(labels), k, np.random.default_rng(seed))


def make_dirichlet(labels: np.ndarray, k: int, seed: int, alpha: float = 0.5) -> Partition:
    return dirichlet_partition(labels, k, alpha, np.random.default_rng(seed))


@pytest.mark.parametrize("num_clients", [1, 7, 20, 300, 1797])
def test_iid_partition_is_valid_and_balanced(digit_labels, num_clients):
    p = make_iid(digit_labels, num_clients, seed=0)
    assert_valid(p, len(digit_labels), num_clients)
    assert p.sizes().max() - p.sizes().min() <= 1


@pytest.mark.parametrize("alpha", [0.01, 0.5, 100.0])
@pytest.mark.parametrize("num_clients", [1, 20, 500, 1797])
def test_dirichlet_partition_is_valid(digit_labels, num_clients, alpha):
    p = make_dirichlet(digit_labels, num_clients, seed=1, alpha=alpha)
    assert_valid(p, len(digit_labels), num_clients)


@pytest.mark.parametrize("make", [make_iid, make_dirichlet])
def test_partitions_are_deterministic(digit_labels, make):
    a, b = make(digit_labels, 20, 3), make(digit_labels, 20, 3)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    c = make(digit_labels, 20, 4)
    assert not np.array_equal(a.indices, c.indices)


def test_label_skew_decreases_with_alpha(digit_labels):
    alphas = (0.05, 0.5, 5.0, 500.0)
    for seed in range(3):
        skews = [label_skew(digit_labels, make_dirichlet(digit_labels, 20, seed, a), 10)
                 for a in alphas]
        assert all(s > t for s, t in zip(skews, skews[1:])), skews
        assert skews[0] > 0.5  # very skewed: most clients see few classes


def test_iid_label_skew_is_sampling_noise_only(digit_labels):
    """A client of n_c examples drawn at random has E|p_ck - p_k| <= sqrt(p_k(1 - p_k) / n_c)
    (Jensen), so the expected skew is at most the size-weighted mean over clients of
    0.5 * sum_k sqrt(p_k (1 - p_k) / n_c): about 0.17 here, against about 0.12 expected
    (normal approximation, sqrt(2 / pi) times the bound) and a standard deviation of the
    20-client mean below 0.01."""
    n, k = len(digit_labels), 20
    p_k = np.bincount(digit_labels) / n
    for seed in range(3):
        part = make_iid(digit_labels, k, seed)
        sizes = part.sizes()
        bound = float(np.sum(sizes / n * 0.5 * np.sum(np.sqrt(p_k * (1 - p_k))) / np.sqrt(sizes)))
        skew = label_skew(digit_labels, part, 10)
        assert 0.0 < skew < bound
        assert skew < label_skew(digit_labels, make_dirichlet(digit_labels, k, seed, 0.5), 10)


def test_label_skew_extremes():
    labels = np.repeat(np.arange(4), 5)  # 4 classes x 5 examples
    one_class_each = Partition(np.arange(20, dtype=np.int64),
                               np.arange(0, 21, 5, dtype=np.int64))
    assert label_skew(labels, one_class_each, 4) == pytest.approx(0.75)
    stratified = Partition.from_assignment(np.arange(20) % 5, 5)  # each client: one per class
    assert label_skew(labels, stratified, 4) == pytest.approx(0.0)
    whole = Partition(np.arange(20, dtype=np.int64), np.array([0, 20], dtype=np.int64))
    assert label_skew(labels, whole, 4) == pytest.approx(0.0)


def test_donations_match_one_at_a_time_greedy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 6, size=rng.integers(1, 12))
        wanted = int(rng.integers(0, max(int(sizes.sum()), 1)))
        greedy = sizes.copy()
        for _ in range(wanted):
            greedy[np.argmax(greedy)] -= 1  # argmax: lowest id among ties
        np.testing.assert_array_equal(_donations(sizes, wanted), sizes - greedy)


def test_empty_clients_are_filled_from_the_largest():
    # One class, alpha tiny: most clients get nothing from the Dirichlet split.
    labels = np.zeros(100, dtype=np.int64)
    p = dirichlet_partition(labels, 30, 1e-3, np.random.default_rng(0))
    assert_valid(p, 100, 30)
    # Replay the split's random draws to get the sizes before the filling.
    rng = np.random.default_rng(0)
    rng.shuffle(np.arange(100))
    bounds = np.floor(np.cumsum(rng.dirichlet(np.full(30, 1e-3))) * 100).astype(np.int64)
    before = np.diff(np.concatenate(([0], bounds[:-1], [100])))
    empty = before == 0
    assert empty.sum() > 20
    expected = before - _donations(before, int(empty.sum())) + empty
    np.testing.assert_array_equal(p.sizes(), expected)


def test_too_many_clients_is_a_config_error():
    labels = np.random.default_rng(0).integers(0, 10, size=60_000)
    for make in (lambda: dirichlet_partition(labels, 100_000, 0.5, np.random.default_rng(0)),
                 lambda: iid_partition(len(labels), 100_000, np.random.default_rng(0))):
        with pytest.raises(ConfigError) as err:
            make()
        assert err.value.option == "clients"
        assert "60000 training examples" in str(err.value)
        assert "data=synthetic" in str(err.value)


def test_fifty_thousand_clients_is_fast():
    labels = np.random.default_rng(0).integers(0, 10, size=60_000)
    start = time.perf_counter()
    p = dirichlet_partition(labels, 50_000, 0.5, np.random.default_rng(0))
    skew = label_skew(labels, p, 10)
    elapsed = time.perf_counter() - start
    assert_valid(p, 60_000, 50_000)
    assert 0.0 < skew <= 1.0
    assert elapsed < 2.0, f"{elapsed:.2f} s"

"""Tests of fedsim.data.loaders: the four loaders, on bundled data and small files written here."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedsim.config import DataConfig
from fedsim.data.base import FederatedData
from fedsim.data.loaders import PartitionedClientData, SyntheticClientData, load_federated_data
from fedsim.errors import ConfigError, DataError


def gather(data: FederatedData) -> tuple[np.ndarray, np.ndarray]:
    """Every client's training data, concatenated."""
    parts = [data.train.client(c) for c in range(data.train.num_clients)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# --------------------------------------------------------------------------- digits


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_digits_shapes_ranges_and_split(partition):
    data = load_federated_data(DataConfig(name="digits", partition=partition), clients=20,
                               seed=0)
    assert data.name == "digits" and data.num_classes == 10 and data.input_shape == (8, 8, 1)
    assert data.train.num_clients == 20
    assert data.x_test.shape == (359, 8, 8, 1)  # round(0.2 * 1797)
    assert data.x_test.dtype == np.float32 and data.y_test.dtype == np.int32
    x, y = gather(data)
    assert x.shape == (1797 - 359, 8, 8, 1) and y.shape == (1797 - 359,)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    for c in range(20):
        assert len(data.train.client(c)[1]) >= 1
    # Train and test are disjoint and together make the whole dataset (as a multiset).
    everything = np.concatenate([x, data.x_test]).reshape(1797, -1)
    original = (load_digits().images / 16.0).astype(np.float32).reshape(1797, -1)
    assert sorted(map(bytes, everything)) == sorted(map(bytes, original))


def test_digits_is_deterministic_and_seeded():
    cfg = DataConfig(name="digits")
    a, b = load_federated_data(cfg, 10, seed=5), load_federated_data(cfg, 10, seed=5)
    c = load_federated_data(cfg, 10, seed=6)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    for cid in (0, 9):
        np.testing.assert_array_equal(a.train.client(cid)[0], b.train.client(cid)[0])
    assert not np.array_equal(a.y_test, c.y_test)


def test_digits_test_fraction_and_too_many_clients():
    data = load_federated_data(DataConfig(name="digits", test_fraction=0.5), 3, seed=0)
    assert len(data.y_test) == 898  # round(0.5 * 1797) (banker's rounding of 898.5)
    with pytest.raises(ConfigError, match="at most the 1438 training examples"):
        load_federated_data(DataConfig(name="digits"), clients=2000, seed=0)


def test_client_data_pickles_small():
    data = load_federated_data(DataConfig(name="digits"), clients=100, seed=0)
    assert isinstance(data.train, PartitionedClientData)
    clone = pickle.loads(pickle.dumps(data.train))
    np.testing.assert_array_equal(clone.client(42)[0], data.train.client(42)[0])


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed_and_client():
    a = SyntheticClientData(num_clients=1000, seed=7)
    b = SyntheticClientData(num_clients=1000, seed=7)
    for cid in (0, 1, 999):
        xa, ya = a.client(cid)
        xb, yb = b.client(cid)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a.client(0)[0][:40], a.client(1)[0][:40])
    other_seed = SyntheticClientData(num_clients=1000, seed=8)
    assert not np.array_equal(a.client(0)[0][:40], other_seed.client(0)[0][:40])
    # A client's data does not depend on the population size.
    np.testing.assert_array_equal(SyntheticClientData(num_clients=5, seed=7).client(3)[0],
                                  a.client(3)[0])


def test_synthetic_train_and_test_parts():
    data = SyntheticClientData(num_clients=50, seed=0, dim=20, num_classes=5)
    for cid in range(50):
        x, y = data.client(cid)
        xt, yt = data.client_test(cid)
        n = len(y) + len(yt)
        assert 50 <= n <= 1050
        assert len(yt) == n // 5 and x.shape == (n - n // 5, 20) and xt.shape == (n // 5, 20)
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert 0 <= y.min() and max(y.max(), yt.max()) < 5
        assert not np.array_equal(x[: len(xt)], xt)
    with pytest.raises(IndexError):
        data.client(50)


def test_synthetic_feature_covariance_follows_leaf():
    """Within a client, feature j (from 1) has variance j^-1.2."""
    data = SyntheticClientData(num_clients=100, seed=1, dim=60)
    centred = [x - x.mean(axis=0) for x, _ in (data.client(c) for c in range(100))]
    var = np.concatenate(centred).var(axis=0)
    expected = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(var, expected, rtol=0.15)


def test_synthetic_population_of_100k_is_instant():
    cfg = DataConfig(name="synthetic", test_clients=10)
    start = time.perf_counter()
    data = load_federated_data(cfg, clients=100_000, seed=3)
    assert time.perf_counter() - start < 1.0
    assert data.train.num_clients == 100_000
    assert data.input_shape == (60,) and data.num_classes == 10 and data.name == "synthetic"
    assert len(pickle.dumps(data.train)) < 1000  # nothing stored per client
    for cid in (99_999, 54_321, 0):
        x, y = data.train.client(cid)
        assert x.shape[1:] == (60,) and len(x) == len(y) >= 40
    # The test split: held-out parts of 10 clients spaced evenly over the population.
    expected = [data.train.client_test(c)[1] for c in range(0, 100_000, 10_000)]
    np.testing.assert_array_equal(data.y_test, np.concatenate(expected))
    assert data.x_test.shape == (len(data.y_test), 60) and data.x_test.dtype == np.float32


def test_synthetic_test_split_uses_every_client_of_a_small_population():
    cfg = DataConfig(name="synthetic", synthetic_dim=8, synthetic_classes=3, test_clients=100)
    data = load_federated_data(cfg, clients=4, seed=0)
    assert data.input_shape == (8,) and data.num_classes == 3
    assert len(data.y_test) == sum(len(data.train.client_test(c)[1]) for c in range(4))


# --------------------------------------------------------------------------- synthetic IID


def fit_softmax_regression(x: np.ndarray, y: np.ndarray, num_classes: int,
                           steps: int = 200, lr: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent (plain numpy)."""
    w = np.zeros((x.shape[1], num_classes), np.float32)
    b = np.zeros(num_classes, np.float32)
    onehot = np.eye(num_classes, dtype=np.float32)[y]
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        g = (p / p.sum(axis=1, keepdims=True) - onehot) / np.float32(len(y))
        w -= lr * (x.T @ g)
        b -= lr * g.sum(axis=0)
    return w, b


def test_synthetic_iid_labels_come_from_one_shared_model():
    data = SyntheticClientData(num_clients=1000, seed=4, dim=60, num_classes=10, iid=True)
    w, b = data.shared_model()
    assert w.shape == (60, 10) and b.shape == (10,)
    # The model is a function of the seed alone, not of the population size.
    for other in (SyntheticClientData(num_clients=3, seed=4, iid=True),
                  SyntheticClientData(num_clients=10**7, seed=4, iid=True)):
        np.testing.assert_array_equal(other.shared_model()[0], w)
        np.testing.assert_array_equal(other.shared_model()[1], b)
    assert not np.array_equal(SyntheticClientData(1000, seed=5, iid=True).shared_model()[0], w)
    labels = set()
    for cid in (0, 17, 999):
        for x, y in (data.client(cid), data.client_test(cid)):
            assert x.dtype == np.float32 and y.dtype == np.int32
            np.testing.assert_array_equal(np.argmax(x.astype(np.float64) @ w + b, axis=1), y)
            labels.update(y.tolist())
    assert len(labels) >= 3
    # LEAF's non-IID clients, by contrast, are not labelled by that model.
    leaf = SyntheticClientData(num_clients=1000, seed=4)
    x, y = leaf.client(17)
    assert np.mean(np.argmax(x.astype(np.float64) @ w + b, axis=1) == y) < 0.5


def test_synthetic_iid_features_are_centred_with_leaf_covariance():
    data = SyntheticClientData(num_clients=100, seed=1, dim=60, iid=True)
    x = np.concatenate([data.client(c)[0] for c in range(100)]).astype(np.float64)
    expected = np.arange(1, 61) ** -1.2
    np.testing.assert_allclose(x.var(axis=0), expected, rtol=0.15)
    assert np.all(np.abs(x.mean(axis=0)) < 5 * np.sqrt(expected / len(x)))


def test_synthetic_iid_is_deterministic_and_independent_of_generation_order():
    a = SyntheticClientData(num_clients=1000, seed=7, iid=True)
    reference = {cid: a.client(cid) for cid in (3, 500, 999)}
    b = SyntheticClientData(num_clients=1000, seed=7, iid=True)
    for cid in range(0, 1000, 37):  # other clients first, in another order
        b.client(cid)
        b.client_test(cid)
    for cid in (999, 3, 500):
        for got, want in zip(b.client(cid), reference[cid]):
            np.testing.assert_array_equal(got, want)
    # Same sample counts and train/held-out split as LEAF's synthetic for (seed, client).
    leaf = SyntheticClientData(num_clients=1000, seed=7)
    for cid in (0, 3, 500, 999):
        assert len(a.client(cid)[1]) == len(leaf.client(cid)[1])
        assert len(a.client_test(cid)[1]) == len(leaf.client_test(cid)[1])
    assert not np.array_equal(a.client(3)[0][:40], a.client(4)[0][:40])
    assert not np.array_equal(a.client(3)[0][:40],
                              SyntheticClientData(1000, seed=8, iid=True).client(3)[0][:40])


@pytest.mark.parametrize("iid,learnable", [(True, True), (False, False)])
def test_a_global_model_learns_synthetic_iid_but_not_leaf_synthetic(iid, learnable):
    """Softmax regression on 200 clients' training data, scored on 50 other
    clients' held-out data: well above chance (0.1) only for Synthetic-IID."""
    data = SyntheticClientData(num_clients=1000, seed=0, iid=iid)
    x = np.concatenate([data.client(c)[0] for c in range(200)])
    y = np.concatenate([data.client(c)[1] for c in range(200)])
    w, b = fit_softmax_regression(x, y, data.num_classes)
    xt = np.concatenate([data.client_test(c)[0] for c in range(200, 250)])
    yt = np.concatenate([data.client_test(c)[1] for c in range(200, 250)])
    accuracy = np.mean(np.argmax(xt @ w + b, axis=1) == yt)
    if learnable:
        assert accuracy > 0.6
    else:
        assert accuracy < 0.3


def test_synthetic_iid_config_and_loader():
    cfg = DataConfig(name="synthetic", synthetic_iid=True, test_clients=10)
    data = load_federated_data(cfg, clients=1_000_000, seed=3)
    assert data.train.iid and data.train.num_clients == 1_000_000
    assert len(pickle.dumps(data.train)) < 1000  # nothing stored per client
    w, b = data.train.shared_model()
    np.testing.assert_array_equal(np.argmax(data.x_test.astype(np.float64) @ w + b, axis=1),
                                  data.y_test)
    expected = [data.train.client_test(c)[1] for c in range(0, 1_000_000, 100_000)]
    np.testing.assert_array_equal(data.y_test, np.concatenate(expected))
    assert not DataConfig(name="synthetic").synthetic_iid
    with pytest.raises(ConfigError, match="data.synthetic_iid"):
        DataConfig(name="digits", synthetic_iid=True)
    with pytest.raises(ConfigError, match="data.synthetic_iid"):
        DataConfig(name="synthetic", synthetic_iid="yes")


def test_synthetic_iid_preset_composes():
    """``data=synthetic_iid`` is data=synthetic with synthetic_iid: true."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedsim.cli import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        iid = compose(config_name="config", overrides=["data=synthetic_iid"])
        leaf = compose(config_name="config", overrides=["data=synthetic"])
    iid_data = OmegaConf.to_container(iid.data)
    leaf_data = OmegaConf.to_container(leaf.data)
    assert iid_data.pop("synthetic_iid") is True and leaf_data.pop("synthetic_iid") is False
    assert iid_data == leaf_data and iid_data["name"] == "synthetic"


# --------------------------------------------------------------------------- mnist


def write_mnist(path: Path, n_train: int = 200, n_test: int = 50) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=n_test).astype(np.uint8),
    }
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("partition", ["dirichlet", "iid"])
def test_mnist_loader(tmp_path, partition):
    path = tmp_path / "mnist.npz"
    raw = write_mnist(path)
    data = load_federated_data(DataConfig(name="mnist", path=str(path), partition=partition),
                               clients=10, seed=0)
    assert data.num_classes == 10 and data.input_shape == (28, 28, 1)
    assert data.x_test.shape == (50, 28, 28, 1) and data.x_test.dtype == np.float32
    np.testing.assert_array_equal(data.y_test, raw["y_test"].astype(np.int32))
    np.testing.assert_allclose(data.x_test[..., 0], raw["x_test"] / 255.0, rtol=1e-6)
    assert isinstance(data.train, PartitionedClientData)
    x, y = gather(data)
    assert x.shape == (200, 28, 28, 1) and y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Client rows are the file's rows.
    idx = data.train.partition.client_indices(3)
    np.testing.assert_allclose(data.train.client(3)[0][..., 0], raw["x_train"][idx] / 255.0,
                               rtol=1e-6)
    np.testing.assert_array_equal(data.train.client(3)[1], raw["y_train"][idx])


def test_mnist_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "mnist.npz"
    with pytest.raises(DataError) as err:
        load_federated_data(DataConfig(name="mnist", path=str(path)), 10, 0)
    message = str(err.value)
    assert str(path) in message and "not found" in message and "nothing is downloaded" in message
    assert "\n" not in message


def test_mnist_malformed_files(tmp_path):
    no_keys = tmp_path / "keys.npz"
    np.savez(no_keys, x_train=np.zeros((5, 28, 28), np.uint8))
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("this is not a zip archive")
    bad_labels = tmp_path / "labels.npz"
    arrays = write_mnist(bad_labels)
    arrays["y_train"] = arrays["y_train"][:10]
    np.savez(bad_labels, **arrays)
    for path, what in [(no_keys, "y_train"), (garbage, "cannot read"), (bad_labels, "y_train"),
                       (tmp_path, "not a file")]:
        with pytest.raises(DataError) as err:
            load_federated_data(DataConfig(name="mnist", path=str(path)), 10, 0)
        message = str(err.value)
        assert str(path) in message and what in message and "\n" not in message, message


# --------------------------------------------------------------------------- emnist


def write_emnist(path: Path, writers: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    """A file in TFF's layout: examples/<writer>/{pixels (n, 28, 28) float32, label (n,)}."""
    rng = np.random.default_rng(seed)
    content = {}
    with h5py.File(path, "w") as f:
        for writer, n in writers.items():
            pixels = rng.random((n, 28, 28), dtype=np.float32)
            label = rng.integers(0, 10, size=n).astype(np.int32)
            f.create_dataset(f"examples/{writer}/pixels", data=pixels)
            f.create_dataset(f"examples/{writer}/label", data=label)
            content[writer] = (pixels, label)
    return content


TRAIN_WRITERS = {"f0123_45": 7, "f0001_02": 3, "f0042_17": 5, "f0007_99": 4, "f0500_01": 6}
TEST_WRITERS = {"f0123_45": 2, "f0001_02": 1, "f0007_99": 3, "f0500_01": 2}  # f0042_17: none


@pytest.mark.parametrize("variant, classes", [("fed_emnist_digitsonly", 10), ("fed_emnist", 62)])
def test_emnist_loader(tmp_path, variant, classes):
    train = write_emnist(tmp_path / f"{variant}_train.h5", TRAIN_WRITERS, seed=1)
    test = write_emnist(tmp_path / f"{variant}_test.h5", TEST_WRITERS, seed=2)
    data = load_federated_data(DataConfig(name="emnist", path=str(tmp_path)), clients=3, seed=0)
    assert data.num_classes == classes and data.input_shape == (28, 28, 1)
    chosen = sorted(TRAIN_WRITERS)[:3]  # f0001_02, f0007_99, f0042_17
    assert data.train.num_clients == 3
    for cid, writer in enumerate(chosen):
        x, y = data.train.client(cid)
        assert x.shape == (TRAIN_WRITERS[writer], 28, 28, 1) and x.dtype == np.float32
        np.testing.assert_array_equal(x[..., 0], train[writer][0])
        np.testing.assert_array_equal(y, train[writer][1])
        assert y.dtype == np.int32
    # Test split: the same writers' test examples (f0042_17 has none).
    expected = [test[w] for w in chosen if w in test]
    np.testing.assert_array_equal(data.x_test[..., 0], np.concatenate([e[0] for e in expected]))
    np.testing.assert_array_equal(data.y_test, np.concatenate([e[1] for e in expected]))


def test_emnist_prefers_digitsonly(tmp_path):
    write_emnist(tmp_path / "fed_emnist_digitsonly_train.h5", {"a": 2})
    write_emnist(tmp_path / "fed_emnist_digitsonly_test.h5", {"a": 1})
    write_emnist(tmp_path / "fed_emnist_train.h5", {"a": 3, "b": 2})
    write_emnist(tmp_path / "fed_emnist_test.h5", {"a": 1})
    data = load_federated_data(DataConfig(name="emnist", path=str(tmp_path)), 1, 0)
    assert data.num_classes == 10 and len(data.train.client(0)[1]) == 2


def test_emnist_too_many_clients(tmp_path):
    write_emnist(tmp_path / "fed_emnist_digitsonly_train.h5", TRAIN_WRITERS)
    write_emnist(tmp_path / "fed_emnist_digitsonly_test.h5", TEST_WRITERS)
    with pytest.raises(ConfigError) as err:
        load_federated_data(DataConfig(name="emnist", path=str(tmp_path)), 6, 0)
    assert err.value.option == "clients" and "at most the 5 writers" in str(err.value)
    assert "fed_emnist_digitsonly_train.h5" in str(err.value)


def test_emnist_missing_files(tmp_path):
    cfg = DataConfig(name="emnist", path=str(tmp_path / "absent"))
    with pytest.raises(DataError, match="not found: .*absent"):
        load_federated_data(cfg, 1, 0)
    with pytest.raises(DataError) as err:  # directory without the files
        load_federated_data(DataConfig(name="emnist", path=str(tmp_path)), 1, 0)
    assert str(tmp_path / "fed_emnist_digitsonly_train.h5") in str(err.value)
    write_emnist(tmp_path / "fed_emnist_digitsonly_train.h5", {"a": 2})
    with pytest.raises(DataError) as err:  # train file without its test file
        load_federated_data(DataConfig(name="emnist", path=str(tmp_path)), 1, 0)
    assert str(tmp_path / "fed_emnist_digitsonly_test.h5") in str(err.value)
    assert "nothing is downloaded" in str(err.value)


def test_emnist_malformed_files(tmp_path):
    train = tmp_path / "fed_emnist_digitsonly_train.h5"
    test = tmp_path / "fed_emnist_digitsonly_test.h5"
    cfg = DataConfig(name="emnist", path=str(tmp_path))
    write_emnist(test, {"a": 1})

    with h5py.File(train, "w") as f:  # no examples group
        f.create_dataset("other", data=np.zeros(3))
    with pytest.raises(DataError) as err:
        load_federated_data(cfg, 1, 0)
    assert str(train) in str(err.value) and "'examples'" in str(err.value)

    with h5py.File(train, "w") as f:  # a writer without labels
        f.create_dataset("examples/a/pixels", data=np.zeros((2, 28, 28), np.float32))
    with pytest.raises(DataError, match="examples/a lacks"):
        load_federated_data(cfg, 1, 0)

    train.write_bytes(b"not an HDF5 file at all")
    with pytest.raises(DataError) as err:
        load_federated_data(cfg, 1, 0)
    assert str(train) in str(err.value) and "\n" not in str(err.value)

"""Federated datasets: what each virtual client trains on, and a global test split.

:func:`load_federated_data` turns a :class:`fedsim.config.DataConfig` into a
:class:`FederatedData`. Its ``train`` member is a :class:`ClientData`: an object
that hands out one client's examples on request. Instances are pickled once into
Ray's object store and shared by every worker, so they hold only numpy arrays and
ints:

* :class:`PartitionedClientData`: a centralized dataset (digits, mnist) or a
  natively federated one read whole (emnist), plus a compact
  :class:`fedsim.data.partition.Partition` saying which rows each client owns.
* :class:`SyntheticClientData`: LEAF's synthetic(alpha, beta), or FedProx's
  Synthetic-IID (``iid=True``), generated per client on demand from
  ``(seed, cid)``; a population of any size costs nothing.

TFF's SqlClientData files (``tff_client_data``: :mod:`fedsim.data.tff`,
:mod:`fedsim.data.shakespeare`, :mod:`fedsim.data.stackoverflow`) and LEAF's JSON
files (``leaf``: :mod:`fedsim.data.leaf`) are read lazily, one client at a time.

Nothing is ever downloaded: ``mnist`` and ``emnist`` read local files, and a
missing or malformed file raises :class:`fedsim.errors.DataError` (one line,
naming the file).

Images are float32 in [0, 1] with a trailing channel axis, ``(n, H, W, 1)``;
labels are int32 class ids in ``[0, num_classes)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsim.config import DATASETS, DataConfig
from fedsim.data.base import FederatedData
from fedsim.data.partition import Partition, dirichlet_partition, iid_partition
from fedsim.errors import ConfigError, DataError

# Tags that keep the random streams of this module apart from other users of the
# same seed (client sampling, model init, ...).
_SPLIT_STREAM = 0x64617461  # shuffling / test hold-out / partition of centralized data
_SYNTHETIC_STREAM = 0x73796E74  # LEAF synthetic clients
_SYNTHETIC_IID_STREAM = 0x73696964  # Synthetic-IID's shared W, b (seed only)

SYNTHETIC_MAX_LOGNORMAL = 1000
"""Cap on LEAF's lognormal(4, 2) draw of a synthetic client's sample count (the
uncapped tail reaches tens of thousands); the count is ``int(min(draw, cap)) + 50``."""

SYNTHETIC_TRAIN_SHARE = 0.8
"""Share of a synthetic client's samples it trains on; the rest is its held-out part."""


@dataclass(frozen=True)
class PartitionedClientData:
    """One array of examples, split over clients by a :class:`Partition`.

    x: float32, ``(num_examples, *input_shape)``. y: int32, ``(num_examples,)``.
    partition: which rows of x/y each client owns.
    """

    x: np.ndarray
    y: np.ndarray
    partition: Partition

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    @property
    def num_clients(self) -> int:
        """Number of clients of the partition."""
        return self.partition.num_clients

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of client ``cid``'s rows of x and y (rows in ascending order)."""
        idx = self.partition.client_indices(cid)
        return self.x[idx], self.y[idx]


@dataclass(frozen=True)
class SyntheticClientData:
    """LEAF's synthetic(alpha, beta) (Li et al., FedProx, 2020), one client at a time.

    Client ``k``'s data are generated from its own random stream, seeded by
    ``(seed, k)``, so any client can be produced on any worker, at any time, with
    the same result, and nothing is stored per client. Following LEAF's generator
    (normal distributions given as (mean, standard deviation), as numpy does)::

        n_k ~ int(min(lognormal(4, 2), 1000)) + 50         samples of client k
        u_k ~ N(0, alpha)      B_k ~ N(0, beta)
        W_k ~ N(u_k, 1)  (classes, dim)      b_k ~ N(u_k, 1)  (classes,)
        v_k ~ N(B_k, 1)  (dim,)
        x ~ N(v_k, diag(j^-1.2 for j = 1..dim))
        y = argmax(W_k x + b_k)

    With ``iid=True`` it is FedProx's Synthetic-IID instead (``generate_iid.py``
    of the FedProx repository): one labelling model shared by every client,
    drawn from a stream of ``seed`` alone (:meth:`shared_model`), and features
    centred at 0 for every client; alpha and beta are ignored::

        W ~ N(0, 1)  (dim, classes)      b ~ N(0, 1)  (classes,)    all clients
        n_k as above (same draw from client k's stream)
        x ~ N(0, diag(j^-1.2 for j = 1..dim))
        y = argmax(softmax(x W + b)) = argmax(x W + b)

    Labels are computed from the float32 features that are handed out, so
    ``argmax(x.astype(float64) @ W + b)`` reproduces them exactly.

    Of the ``n_k`` samples the first ``n_k - n_k // 5`` (80%) are the client's
    training data (:meth:`client`), the last ``n_k // 5`` its held-out part
    (:meth:`client_test`: the ``client_test`` capability, so ``federated_eval``
    evaluates clients on their own held-out samples, the view that LEAF's
    synthetic(1, 1), where every client labels by its own model, needs).

    num_clients: population size. seed: root seed. alpha, beta: model and data
    heterogeneity (standard deviations, >= 0). dim: feature dimension.
    num_classes: number of classes. iid: Synthetic-IID (shared W, b) instead of
    LEAF's per-client models.
    """

    num_clients: int
    seed: int
    alpha: float = 1.0
    beta: float = 1.0
    dim: int = 60
    num_classes: int = 10
    iid: bool = False

    def shared_model(self) -> tuple[np.ndarray, np.ndarray]:
        """Synthetic-IID's labelling model: W float64 ``(dim, num_classes)``, b
        ``(num_classes,)``, the same for every client; a function of ``seed`` only
        (not of the population size). Regenerated on each call (a few hundred
        draws), so nothing but the seed is pickled to the workers."""
        rng = np.random.default_rng(
            np.random.SeedSequence(self.seed, spawn_key=(_SYNTHETIC_IID_STREAM,)))
        w = rng.normal(0.0, 1.0, size=(self.dim, self.num_classes))
        b = rng.normal(0.0, 1.0, size=self.num_classes)
        return w, b

    def _generate(self, cid: int) -> tuple[np.ndarray, np.ndarray, int]:
        """All samples of client ``cid`` and the number that are training samples."""
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range [0, {self.num_clients})")
        rng = np.random.default_rng(
            np.random.SeedSequence([self.seed, cid], spawn_key=(_SYNTHETIC_STREAM,)))
        n = int(min(rng.lognormal(4.0, 2.0), SYNTHETIC_MAX_LOGNORMAL)) + 50
        std = np.arange(1, self.dim + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
        n_train = n - n // 5
        if self.iid:
            w, b = self.shared_model()
            x = (std * rng.standard_normal((n, self.dim))).astype(np.float32)
            y = np.argmax(x.astype(np.float64) @ w + b, axis=1)
            return x, y.astype(np.int32), n_train
        u = rng.normal(0.0, self.alpha)
        b_mean = rng.normal(0.0, self.beta)
        w = rng.normal(u, 1.0, size=(self.num_classes, self.dim))
        b = rng.normal(u, 1.0, size=self.num_classes)
        v = rng.normal(b_mean, 1.0, size=self.dim)
        x = v + std * rng.standard_normal((n, self.dim))
        y = np.argmax(x @ w.T + b, axis=1)
        return x.astype(np.float32), y.astype(np.int32), n_train

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Training part (80%) of client ``cid``: x float32 ``(n, dim)``, y int32."""
        x, y, n_train = self._generate(cid)
        return x[:n_train], y[:n_train]

    def client_test(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Held-out part (20%, at least 10 samples) of client ``cid``."""
        x, y, n_train = self._generate(cid)
        return x[n_train:], y[n_train:]


def load_federated_data(cfg: DataConfig, clients: int, seed: int) -> FederatedData:
    """Load (or set up the generation of) ``cfg.name`` split over ``clients`` clients.

    Deterministic given ``seed``. Raises :class:`ConfigError` when the dataset
    cannot feed that many clients and :class:`DataError` when a file is missing
    or malformed.
    """
    if clients < 1:
        raise ConfigError("clients", "an integer >= 1", clients)
    if cfg.name == "digits":
        return _load_digits(cfg, clients, seed)
    if cfg.name == "synthetic":
        return _load_synthetic(cfg, clients, seed)
    if cfg.name == "mnist":
        return _load_mnist(cfg, clients, seed)
    if cfg.name == "emnist":
        return _load_emnist(cfg, clients)
    if cfg.name == "tff_client_data":
        if cfg.tff_dataset == "shakespeare":
            from fedsim.data.shakespeare import load_shakespeare

            return load_shakespeare(cfg, clients)
        if cfg.tff_dataset == "stackoverflow":
            from fedsim.data.stackoverflow import load_stackoverflow

            return load_stackoverflow(cfg, clients)
        from fedsim.data.tff import load_tff_data

        return load_tff_data(cfg, clients, seed)
    if cfg.name == "leaf":
        from fedsim.data.leaf import load_leaf

        return load_leaf(cfg, clients)
    raise ConfigError("data.name", "one of " + ", ".join(DATASETS), cfg.name)


# --------------------------------------------------------------------------- helpers


def _split_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM,)))


def _partition(cfg: DataConfig, y: np.ndarray, clients: int,
               rng: np.random.Generator) -> Partition:
    """Split a centralized training set as ``cfg.partition`` says."""
    if cfg.partition == "iid":
        return iid_partition(len(y), clients, rng)
    return dirichlet_partition(y, clients, cfg.alpha, rng)


def _not_found(path: Path, name: str) -> DataError:
    return DataError(f"data.path: file not found: {path} "
                     f"(data={name} reads a local file; nothing is downloaded)")


def _malformed(path: Path, what: str) -> DataError:
    return DataError(f"data.path: malformed file {path}: {what}")


def _as_images(pixels: np.ndarray, scale: float) -> np.ndarray:
    """``(n, H, W)`` pixels -> float32 ``(n, H, W, 1)`` divided by ``scale``."""
    return (np.asarray(pixels, dtype=np.float32) / np.float32(scale))[..., None]


# --------------------------------------------------------------------------- datasets


def _load_digits(cfg: DataConfig, clients: int, seed: int) -> FederatedData:
    """scikit-learn's 1,797 8x8 digits: seeded shuffle, test hold-out, then split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = _as_images(bunch.images, 16.0)  # pixel values are 0..16
    y = np.asarray(bunch.target, dtype=np.int32)
    rng = _split_rng(seed)
    order = rng.permutation(len(y))
    n_test = min(max(int(round(cfg.test_fraction * len(y))), 1), len(y) - 1)
    test, train = order[:n_test], order[n_test:]
    x_train, y_train = x[train], y[train]
    partition = _partition(cfg, y_train, clients, rng)
    return FederatedData(
        train=PartitionedClientData(x_train, y_train, partition),
        x_test=x[test], y_test=y[test], num_classes=10,
        input_shape=tuple(x.shape[1:]), name=cfg.name)


def _load_synthetic(cfg: DataConfig, clients: int, seed: int) -> FederatedData:
    """LEAF synthetic or Synthetic-IID; the test split is the held-out parts of
    evenly spaced clients."""
    train = SyntheticClientData(
        num_clients=clients, seed=seed, alpha=cfg.synthetic_alpha, beta=cfg.synthetic_beta,
        dim=cfg.synthetic_dim, num_classes=cfg.synthetic_classes, iid=cfg.synthetic_iid)
    m = min(cfg.test_clients, clients)
    test_cids = (np.arange(m, dtype=np.int64) * clients) // m
    parts = [train.client_test(int(c)) for c in test_cids]
    return FederatedData(
        train=train,
        x_test=np.concatenate([p[0] for p in parts]),
        y_test=np.concatenate([p[1] for p in parts]),
        num_classes=cfg.synthetic_classes, input_shape=(cfg.synthetic_dim,), name=cfg.name)


def _load_mnist(cfg: DataConfig, clients: int, seed: int) -> FederatedData:
    """Keras ``mnist.npz`` (uint8 images): the train split is partitioned, the
    test split is the file's."""
    path = Path(str(cfg.path)).expanduser()
    if not path.exists():
        raise _not_found(path, cfg.name)
    if not path.is_file():
        raise _malformed(path, "not a file (expected Keras' mnist.npz)")
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise _malformed(path, "no array " + ", ".join(missing)
                                 + " (expected Keras' mnist.npz with " + ", ".join(keys) + ")")
            arrays = {k: np.asarray(npz[k]) for k in keys}
    except DataError:
        raise
    except Exception as err:  # zipfile/pickle/OS errors: report one line
        raise _malformed(path, f"cannot read as .npz ({type(err).__name__}: {err})") from err
    for split in ("train", "test"):
        xs, ys = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if xs.ndim != 3 or ys.ndim != 1 or len(xs) != len(ys) or len(xs) == 0:
            raise _malformed(path, f"x_{split} {xs.shape} / y_{split} {ys.shape}: expected "
                             "non-empty (n, height, width) images and (n,) labels")
        if not np.issubdtype(ys.dtype, np.integer) or ys.min() < 0 or ys.max() > 9:
            raise _malformed(path, f"y_{split} must hold integer labels 0..9")
    x_train = _as_images(arrays["x_train"], 255.0)
    y_train = arrays["y_train"].astype(np.int32)
    partition = _partition(cfg, y_train, clients, _split_rng(seed))
    return FederatedData(
        train=PartitionedClientData(x_train, y_train, partition),
        x_test=_as_images(arrays["x_test"], 255.0),
        y_test=arrays["y_test"].astype(np.int32),
        num_classes=10, input_shape=tuple(x_train.shape[1:]), name=cfg.name)


_EMNIST_FILES = (
    # (train file, test file, number of classes)
    ("fed_emnist_digitsonly_train.h5", "fed_emnist_digitsonly_test.h5", 10),
    ("fed_emnist_train.h5", "fed_emnist_test.h5", 62),
)


def _read_writers(path: Path, writers: list[str] | None,
                  num_classes: int) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Read TFF's ``examples/<writer>/{pixels,label}`` from one h5 file.

    writers: which writers to read, in this order (absent ones are skipped);
    None: list them all (sorted) and read none. Returns the writer ids read (or
    all, sorted, when ``writers`` is None), their pixels and their labels.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "examples" not in f or not isinstance(f["examples"], h5py.Group):
                raise _malformed(path, "no group 'examples' (expected TFF's federated "
                                 "EMNIST layout examples/<writer>/{pixels,label})")
            examples = f["examples"]
            if writers is None:
                return sorted(examples.keys()), [], []
            read, xs, ys = [], [], []
            for w in writers:
                if w not in examples:
                    continue
                group = examples[w]
                if "pixels" not in group or "label" not in group:
                    raise _malformed(path, f"examples/{w} lacks 'pixels' or 'label'")
                pixels = np.asarray(group["pixels"][()], dtype=np.float32)
                label = np.asarray(group["label"][()]).reshape(-1)
                if pixels.ndim != 3 or len(pixels) != len(label):
                    raise _malformed(path, f"examples/{w}: pixels {pixels.shape} and label "
                                     f"{label.shape}, expected (n, 28, 28) and (n,)")
                if len(label) and (label.min() < 0 or label.max() >= num_classes):
                    raise _malformed(path, f"examples/{w}: labels outside 0..{num_classes - 1}")
                read.append(w)
                xs.append(pixels)
                ys.append(label.astype(np.int32))
            return read, xs, ys
    except DataError:
        raise
    except Exception as err:  # not HDF5, truncated, unreadable datasets, ...
        raise _malformed(path, f"cannot read as HDF5 ({type(err).__name__}: {err})") from err


def _load_emnist(cfg: DataConfig, clients: int) -> FederatedData:
    """TFF's federated EMNIST: the first ``clients`` writers (sorted ids) are the
    clients; the test split is those writers' examples in the test file."""
    directory = Path(str(cfg.path)).expanduser()
    if not directory.exists():
        raise _not_found(directory, cfg.name)
    if not directory.is_dir():
        raise _malformed(directory, "not a directory (expected one holding "
                         f"{_EMNIST_FILES[0][0]} and {_EMNIST_FILES[0][1]})")
    for train_name, test_name, num_classes in _EMNIST_FILES:  # noqa: B007 (used after break)
        if (directory / train_name).is_file():
            break
    else:
        raise _not_found(directory / _EMNIST_FILES[0][0], cfg.name)
    train_path, test_path = directory / train_name, directory / test_name
    if not test_path.is_file():
        raise _not_found(test_path, cfg.name)

    all_writers, _, _ = _read_writers(train_path, None, num_classes)
    if len(all_writers) < clients:
        raise ConfigError("clients", f"at most the {len(all_writers)} writers in {train_path}",
                          clients)
    writers, xs, ys = _read_writers(train_path, all_writers[:clients], num_classes)
    _, xs_test, ys_test = _read_writers(test_path, writers, num_classes)
    if not xs_test or sum(len(y) for y in ys_test) == 0:
        raise _malformed(test_path, "no test examples for the selected writers")

    sizes = np.array([len(y) for y in ys], dtype=np.int64)
    if np.any(sizes == 0):
        empty = writers[int(np.flatnonzero(sizes == 0)[0])]
        raise _malformed(train_path, f"writer {empty} has no training examples")
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    partition = Partition(indices=np.arange(offsets[-1], dtype=np.int64), offsets=offsets)
    x_train = _as_images(np.concatenate(xs), 1.0)
    return FederatedData(
        train=PartitionedClientData(x_train, np.concatenate(ys), partition),
        x_test=_as_images(np.concatenate(xs_test), 1.0),
        y_test=np.concatenate(ys_test),
        num_classes=num_classes, input_shape=tuple(x_train.shape[1:]), name=cfg.name)

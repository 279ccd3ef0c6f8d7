"""TensorFlow Federated ``ClientData`` as fedsim's client population.

``data=tff_client_data`` reads a TFF ``SqlClientData`` sqlite file, the format of
TFF's hosted datasets and of ``tff.simulation.datasets.save_to_sql_client_data``:

- ``data.tff_dataset=emnist`` / ``emnist_only_digits``: ``emnist_all.sqlite``
  (splits ``all_train``/``all_test``, 62 classes, or ``digits_only_train``/
  ``digits_only_test``, 10); ``cifar100``: ``cifar100.sqlite`` (``train``/``test``,
  100 fine labels, or with ``data.cifar100_label=coarse_label`` the 20 coarse
  ones, images scaled to [0, 1]). ``shakespeare`` and ``stackoverflow`` are
  read by :mod:`fedsim.data.shakespeare` / :mod:`fedsim.data.stackoverflow`
  through this module's sqlite helpers. The file is looked up where
  ``tff.simulation.datasets.<name>.load_data(cache_dir=...)`` caches it:
  ``data.path`` as the cache directory (null: ``~/.tff``) or the file itself.
  A missing file is a :class:`DataError` naming the expected path; nothing is
  downloaded.
- ``data.tff_dataset=null``: ``data.path`` is any ``SqlClientData`` file whose
  elements are ``tf.train.Example`` protos with an input feature ``data.x_key``
  and an integer label ``data.y_key`` (``data.x_shape`` reshapes the flat
  stored input, ``data.train_split``/``data.test_split`` pick splits).

Client ids, sorted (as ``SqlClientData.client_ids``), become virtual clients
``0..clients-1``: the first ``clients`` ids with at least one example. More
clients than ids is a :class:`ConfigError`. The global test split is the test
split's examples of those same ids (EMNIST's writers have both), or the whole
test split when it shares no ids with them (CIFAR-100's test clients are other
ones). When they share ids, each client also offers ``client_test(cid)``: its
own rows of the test split (:class:`SqlTFFClientDataWithTest`); CIFAR-100's
clients have no such capability. A custom file without ``test_split`` holds out
``test_fraction`` of its client ids (at least one, drawn with the seed) as the
test split instead.

Workers stay lazy: what is shipped to them (:class:`SqlTFFClientData`) holds the
file's path, the selected ids and the parsing parameters, never examples. Each
worker opens the file itself (read-only) and reads one client's rows when
:meth:`~SqlTFFClientData.client` asks; on a multi-node cluster the file must be
at the same path on every node. The ``tf.train.Example`` protos are decoded
here, without TensorFlow (:func:`parse_example`).

From Python, :func:`load_tff_client_data` takes a TFF ``ClientData`` object
directly: a ``SqlClientData`` is read as above; any other (``TestClientData``,
a ``preprocess``-ed dataset such as ``emnist.load_data()[0]``) is shipped to the
workers as it is (it must pickle) and read through
``create_tf_dataset_for_client``, one client at a time.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence
from urllib.parse import quote

import numpy as np

from fedsim.config import DataConfig
from fedsim.data.base import FederatedData
from fedsim.errors import ConfigError, DataError

# Where TFF's load_data(cache_dir=None) keeps its files (download.get_compressed_file).
TFF_CACHE_DIR = Path("~/.tff")


@dataclass(frozen=True)
class TFFDataset:
    """One of TFF's hosted federated datasets, as cached by its ``load_data``."""

    file: str
    train_split: str
    test_split: str
    x_key: str
    y_key: str
    x_shape: tuple[int, ...]
    num_classes: int
    x_scale: float
    loader: str


TFF_DATASETS: dict[str, TFFDataset] = {
    "emnist": TFFDataset("emnist_all.sqlite", "all_train", "all_test", "pixels", "label",
                         (28, 28, 1), 62, 1.0, "emnist.load_data(only_digits=False)"),
    "emnist_only_digits": TFFDataset("emnist_all.sqlite", "digits_only_train",
                                     "digits_only_test", "pixels", "label", (28, 28, 1), 10,
                                     1.0, "emnist.load_data(only_digits=True)"),
    "cifar100": TFFDataset("cifar100.sqlite", "train", "test", "image", "label", (32, 32, 3),
                           100, 1.0 / 255.0, "cifar100.load_data()"),
}

# TFF's text datasets: their files (read by fedsim.data.shakespeare and
# fedsim.data.stackoverflow, through the sqlite helpers below) and loaders.
TFF_TEXT_DATASETS: dict[str, tuple[str, str]] = {
    "shakespeare": ("shakespeare.sqlite", "shakespeare.load_data()"),
    "stackoverflow": ("stackoverflow.sqlite", "stackoverflow.load_data()"),
}

_HOLDOUT_STREAM = 0x74666664  # seeded choice of held-out test clients


# --------------------------------------------------------------------- tf.train.Example


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message's wire format."""
    pos, n = 0, len(buf)
    while pos < n:
        value: Any
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > n:
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _packed_varints(buf: bytes) -> np.ndarray:
    """Decode packed varints (vectorized) as int64 (two's complement)."""
    a = np.frombuffer(buf, np.uint8)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a[-1] >= 0x80:
        raise ValueError("truncated packed varints")
    end = a < 0x80
    if end.all():
        return a.astype(np.int64)
    group = np.concatenate([[0], np.cumsum(end)[:-1]])
    starts = np.concatenate([[0], np.flatnonzero(end)[:-1] + 1])
    shift = (np.arange(a.size) - starts[group]) * 7
    out = np.zeros(int(end.sum()), np.uint64)
    np.add.at(out, group, (a & 0x7F).astype(np.uint64) << shift.astype(np.uint64))
    return out.view(np.int64)


def _feature(buf: bytes, allow_bytes: bool = False) -> Any:
    """A ``tf.train.Feature``'s values: float32 or int64 arrays; a bytes list as a
    list of ``bytes`` when ``allow_bytes`` (refused otherwise)."""
    for number, _, lst in _fields(buf):
        if number == 2:  # FloatList
            parts = [np.frombuffer(v, "<f4") for n, w, v in _fields(lst) if n == 1]
            return (np.concatenate(parts) if parts else np.zeros(0, "<f4")).astype(np.float32)
        if number == 3:  # Int64List
            parts = [_packed_varints(v) if w == 2 else
                     np.array([v - (1 << 64) if v >= 1 << 63 else v], np.int64)
                     for n, w, v in _fields(lst) if n == 1]
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if number == 1:  # BytesList
            if not allow_bytes:
                raise ValueError("a bytes feature (fedsim needs numeric inputs and labels)")
            return [bytes(v) for n, _, v in _fields(lst) if n == 1]
    return np.zeros(0, np.float32)


def _parse(serialized: bytes, keys: Optional[Sequence[str]], allow_bytes: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, _, features in _fields(serialized):
        if number != 1:
            continue
        for n2, _, entry in _fields(features):
            if n2 != 1:
                continue
            key, value = None, b""
            for n3, _, v in _fields(entry):
                if n3 == 1:
                    key = bytes(v).decode()
                elif n3 == 2:
                    value = v
            if key is not None and (keys is None or key in keys):
                out[key] = _feature(value, allow_bytes)
    return out


def parse_example(serialized: bytes, keys: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """Decode a serialized ``tf.train.Example`` into flat numpy arrays.

    keys: the features to decode (None: all). Float features come back float32,
    integer ones int64. Pure Python and numpy: TensorFlow is not imported.
    """
    return _parse(serialized, keys, False)


def parse_example_features(serialized: bytes,
                           keys: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """:func:`parse_example` that also decodes bytes features, as a list of
    ``bytes`` (one per value: TFF's text datasets store one string per feature,
    e.g. Shakespeare's ``snippets``, StackOverflow's ``tokens``)."""
    return _parse(serialized, keys, True)


# ----------------------------------------------------------------------------- sqlite


_CONNECTIONS: dict[tuple, sqlite3.Connection] = {}


def _connect(path: str) -> sqlite3.Connection:
    """A read-only connection to ``path``, one per process and file version
    (opened on first use; a replaced file gets a new one)."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_mtime_ns)
    conn = _CONNECTIONS.get(key)
    if conn is None:
        for old in [k for k in _CONNECTIONS if k[0] == path]:
            _CONNECTIONS.pop(old).close()
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True,
                               check_same_thread=False)
        _CONNECTIONS[key] = conn
    return conn


def _split_clause(split: Optional[str], exclude_split: Optional[str]) -> tuple[str, tuple]:
    if split is not None:
        return " AND split_name = ?", (split,)
    if exclude_split is not None:
        return " AND split_name != ?", (exclude_split,)
    return "", ()


def _check_database(path: Path) -> None:
    """Refuse a file that is not a TFF SqlClientData database (one line)."""
    try:
        conn = _connect(str(path))
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        missing = {"examples", "client_metadata"} - tables
        if not missing:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(examples)")}
            missing = {"split_name", "client_id", "serialized_example_proto"} - cols
            meta = {r[1] for r in conn.execute("PRAGMA table_info(client_metadata)")}
            missing |= {"split_name", "client_id", "num_examples"} - meta
    except sqlite3.Error as err:
        for key in [k for k in _CONNECTIONS if k[0] == str(path)]:
            _CONNECTIONS.pop(key).close()
        raise DataError(f"data.path: malformed file {path}: cannot read as SQLite "
                        f"({type(err).__name__}: {err})") from err
    if missing:
        raise DataError(f"data.path: malformed file {path}: not a TFF SqlClientData database "
                        f"(missing {', '.join(sorted(missing))})")


def _client_ids(path: Path, split: Optional[str], exclude_split: Optional[str]) -> list[str]:
    """Sorted ids of the clients with at least one example in the split."""
    clause, params = _split_clause(split, exclude_split)
    rows = _connect(str(path)).execute(
        "SELECT client_id, SUM(num_examples) FROM client_metadata WHERE 1 = 1" + clause
        + " GROUP BY client_id", params).fetchall()
    return sorted(str(cid) for cid, n in rows if n and n > 0)


def client_ids_in_split(path: os.PathLike | str, split: Optional[str]) -> list[str]:
    """Sorted ids of the clients with at least one example in ``split`` of the
    ``SqlClientData`` file ``path`` (``client_metadata``, as TFF's
    ``SqlClientData.client_ids``; None: any split)."""
    return _client_ids(Path(path), split, None)


def select_train_ids(path: Path, split: str, clients: Optional[int], what: str,
                     hint: str = "") -> tuple[str, ...]:
    """The first ``clients`` (all: None) sorted ids with examples in ``split`` of the
    file ``path``; a DataError if it has none (``hint`` says what the file should
    hold), a ConfigError naming ``clients`` if it has fewer (``what`` they are)."""
    ids = client_ids_in_split(path, split)
    if not ids:
        raise DataError(f"data.path: malformed file {path}: no clients with examples in the "
                        f"{split!r} split{hint}")
    if clients is not None and clients > len(ids):
        raise ConfigError("clients", f"at most the {len(ids)} {what} with training examples "
                          f"in {path}", clients)
    return tuple(ids[:clients] if clients is not None else ids)


def client_rows(path: os.PathLike | str, client_id: str, split: Optional[str]) -> list[bytes]:
    """The serialized ``tf.train.Example`` protos of one client in one split, in
    file order (what TFF's ``SqlClientData.create_tf_dataset_for_client`` reads)."""
    clause, params = _split_clause(split, None)
    rows = _connect(str(path)).execute(
        "SELECT serialized_example_proto FROM examples WHERE client_id = ?" + clause
        + " ORDER BY rowid", (client_id, *params)).fetchall()
    return [bytes(r[0]) for r in rows]


def split_rows(path: os.PathLike | str, split: str, limit: Optional[int]) -> list[bytes]:
    """The first ``limit`` (None: all) serialized protos of ``split``, in file order."""
    sql = "SELECT serialized_example_proto FROM examples WHERE split_name = ? ORDER BY rowid"
    params: tuple = (split,)
    if limit is not None:
        sql += " LIMIT ?"
        params = (split, int(limit))
    return [bytes(r[0]) for r in _connect(str(path)).execute(sql, params).fetchall()]


def check_database(path: os.PathLike | str) -> None:
    """One-line DataError unless ``path`` is a TFF ``SqlClientData`` database."""
    _check_database(Path(path))


def _check_keys(element: Mapping[str, Any], everything: Any, x_key: str, y_key: str,
                where: str) -> None:
    """DataError naming the option and the features there are, if a key is missing."""
    for key, option in ((x_key, "data.x_key"), (y_key, "data.y_key")):
        if key not in element:
            names = ", ".join(sorted(everything())) or "no features"
            raise DataError(f"{where}: no feature {option}={key!r} (the elements have {names})")


def _as_xy(elements: Sequence[Mapping[str, np.ndarray]], where: str, x_key: str, y_key: str,
           x_shape: Optional[tuple[int, ...]], x_scale: float,
           num_classes: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Stack decoded elements into float32 x ``(n, *x_shape)`` and int32 y ``(n,)``."""
    if not elements:
        raise DataError(f"{where}: no examples")
    _check_keys(elements[0], lambda: elements[0], x_key, y_key, where)
    try:
        x = np.stack([np.asarray(e[x_key]) for e in elements])
        y = np.stack([np.asarray(e[y_key]).reshape(-1) for e in elements])
    except ValueError as err:
        raise DataError(f"{where}: elements of different shapes ({err})") from err
    if y.shape[1] != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: data.y_key={y_key!r} must be one integer label per "
                        f"element (got {y.dtype} of {y.shape[1]} values)")
    y = y[:, 0]
    if x_shape is not None:
        if int(np.prod(x_shape)) != int(np.prod(x.shape[1:])):
            raise DataError(f"{where}: data.x_shape={list(x_shape)} does not fit inputs of "
                            f"shape {list(x.shape[1:])}")
        x = x.reshape((len(x), *x_shape))
    x = x.astype(np.float32)
    if x_scale != 1.0:
        x *= np.float32(x_scale)
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        raise DataError(f"{where}: labels outside 0..{(num_classes or 0) - 1} "
                        f"(min {y.min()}, max {y.max()})")
    return x, y.astype(np.int32)


# ----------------------------------------------------------------------------- ClientData


@dataclass(frozen=True)
class SqlTFFClientData:
    """A TFF ``SqlClientData`` file as fedsim's :class:`~fedsim.data.base.ClientData`.

    Holds only the path, the selected client ids (virtual client ``c`` is
    ``client_ids[c]``) and how to decode elements; ``client(c)`` reads that client's
    rows from the file (opened read-only, once per process).

    split / exclude_split: rows of this ``split_name`` only / of any other one
    (both None: all rows). x_shape: shape of one input (None: flat, as stored).
    x_scale: factor applied to the inputs. num_classes: labels lie in
    ``[0, num_classes)``.
    """

    path: str
    client_ids: tuple[str, ...]
    x_key: str
    y_key: str
    x_shape: Optional[tuple[int, ...]]
    num_classes: int
    x_scale: float = 1.0
    split: Optional[str] = None
    exclude_split: Optional[str] = None

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    def elements(self, client_id: str) -> list[dict[str, np.ndarray]]:
        """The decoded elements (x_key and y_key only) of the client named ``client_id``."""
        clause, params = _split_clause(self.split, self.exclude_split)
        rows = _connect(self.path).execute(
            "SELECT serialized_example_proto FROM examples WHERE client_id = ?" + clause
            + " ORDER BY rowid", (client_id, *params)).fetchall()
        try:
            out = [parse_example(r[0], (self.x_key, self.y_key)) for r in rows]
            if out:
                _check_keys(out[0], lambda: parse_example(rows[0][0]), self.x_key, self.y_key,
                            f"{self.path}: client {client_id!r}")
        except (ValueError, IndexError) as err:
            raise DataError(f"data.path: malformed file {self.path}: client {client_id!r}: "
                            f"{err}") from err
        return out

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return _client_xy(self, cid, f"{self.path}: client")


@dataclass(frozen=True)
class SqlTFFClientDataWithTest(SqlTFFClientData):
    """:class:`SqlTFFClientData` whose clients also hold their OWN test rows: the
    same client id's rows in ``test_split`` (TFF's EMNIST writers are in both
    ``*_train`` and ``*_test``). Adds the ``client_test`` capability; a file whose
    test clients are other ids (CIFAR-100) is a plain :class:`SqlTFFClientData`."""

    test_split: str = "test"

    def client_test(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``cid``'s examples in ``test_split`` (zero-length arrays of the
        training layout when it has none)."""
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range [0, {self.num_clients})")
        name = self.client_ids[cid]
        test = SqlTFFClientData(self.path, self.client_ids, self.x_key, self.y_key,
                                self.x_shape, self.num_classes, self.x_scale, self.test_split)
        elements = test.elements(name)
        if not elements:
            shape = self.x_shape if self.x_shape is not None else self.client(cid)[0].shape[1:]
            return np.zeros((0, *shape), np.float32), np.zeros(0, np.int32)
        return _as_xy(elements, f"{self.path}: test split of client {name!r}", self.x_key,
                      self.y_key, self.x_shape, self.x_scale, self.num_classes)


def _client_xy(data: Any, cid: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Virtual client ``cid`` of ``data`` (a SqlTFFClientData or ObjectTFFClientData)
    as fedsim's ``(x, y)`` arrays; ``where`` names the source in errors."""
    if not 0 <= cid < data.num_clients:
        raise IndexError(f"client {cid} out of range [0, {data.num_clients})")
    name = data.client_ids[cid]
    return _as_xy(data.elements(name), f"{where} {name!r}", data.x_key, data.y_key,
                  data.x_shape, data.x_scale, data.num_classes)


@dataclass(frozen=True)
class ObjectTFFClientData:
    """Any TFF ``ClientData`` object as fedsim's :class:`~fedsim.data.base.ClientData`.

    The object itself is shipped to the workers (it must pickle; a
    ``TestClientData`` carries its arrays, a ``preprocess``-ed ``SqlClientData``
    only its path and functions). ``client(c)`` iterates
    ``create_tf_dataset_for_client(client_ids[c])``.
    """

    client_data: Any
    client_ids: tuple[str, ...]
    x_key: str
    y_key: str
    x_shape: Optional[tuple[int, ...]]
    num_classes: int
    x_scale: float = 1.0

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    def elements(self, client_id: str) -> list[dict[str, np.ndarray]]:
        ds = self.client_data.create_tf_dataset_for_client(client_id)
        out: list[dict[str, np.ndarray]] = []
        for e in ds.as_numpy_iterator():
            if not isinstance(e, Mapping):
                raise DataError(f"ClientData client {client_id!r}: elements must be "
                                f"mappings of features, got {type(e).__name__}")
            if not out:
                _check_keys(e, lambda e=e: e, self.x_key, self.y_key,
                            f"ClientData client {client_id!r}")
            out.append({k: np.asarray(e[k]) for k in (self.x_key, self.y_key)})
        return out

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return _client_xy(self, cid, "ClientData client")


# ----------------------------------------------------------------------------- loading


def tff_cache_file(dataset: str, path: Optional[str] = None) -> Path:
    """The sqlite file TFF's ``load_data`` reads for ``dataset``: ``path`` as its
    ``cache_dir`` (None: ``~/.tff``), or ``path`` itself when it names a file."""
    file = (TFF_DATASETS[dataset].file if dataset in TFF_DATASETS
            else TFF_TEXT_DATASETS[dataset][0])
    base = Path(path).expanduser() if path else TFF_CACHE_DIR.expanduser()
    if base.is_file() or base.suffix == ".sqlite":
        return base
    return base / file


def find_tff_file(dataset: str, path: Optional[str]) -> Path:
    """:func:`tff_cache_file`, checked: a one-line DataError naming the expected
    path when it is missing (nothing is downloaded)."""
    file = tff_cache_file(dataset, path)
    if not file.is_file():
        name, loader = ((TFF_DATASETS[dataset].file, TFF_DATASETS[dataset].loader)
                        if dataset in TFF_DATASETS else TFF_TEXT_DATASETS[dataset])
        raise DataError(
            f"data.path: file not found: {file} (data.tff_dataset={dataset} reads "
            f"{name}, the file tff.simulation.datasets.{loader} caches in its "
            f"cache_dir (default ~/.tff); set data.path to that directory or file. Nothing is "
            f"downloaded: fetch https://storage.googleapis.com/tff-datasets-public/"
            f"{name}.lzma and decompress it there)")
    return file


def _select(ids: Sequence[str], clients: Optional[int], where: str) -> list[str]:
    if clients is None:
        return list(ids)
    if clients > len(ids):
        raise ConfigError("clients", f"at most the {len(ids)} client ids (with examples) in "
                          f"{where}", clients)
    return list(ids[:clients])


def _holdout(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split sorted ids into (training ids, held-out test ids), seeded."""
    if len(ids) < 2:
        raise DataError(f"cannot hold out test clients from {len(ids)} client id(s); give a "
                        "test split (data.test_split) or more clients")
    m = min(max(int(round(fraction * len(ids))), 1), len(ids) - 1)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_HOLDOUT_STREAM,)))
    held = set(rng.choice(len(ids), size=m, replace=False).tolist())
    return ([c for i, c in enumerate(ids) if i not in held],
            [c for i, c in enumerate(ids) if i in held])


def _test_ids(test_ids: Sequence[str], train_ids: Sequence[str]) -> list[str]:
    """The test clients: those of the training clients, or all when none overlap."""
    shared = sorted(set(test_ids) & set(train_ids))
    return shared if shared else list(test_ids)


def _read_all(source: Any, ids: Sequence[str]) -> list[dict[str, np.ndarray]]:
    return [e for cid in ids for e in source.elements(cid)]


def _finish(train: Any, test_source: Any, test_ids: Sequence[str], name: str,
            num_classes: Optional[int]) -> FederatedData:
    """Infer num_classes if needed, read the test split, check one training client."""
    import dataclasses

    test_elements = _read_all(test_source, test_ids)
    if num_classes is None:
        labels = [int(np.asarray(e[train.y_key]).reshape(-1)[0])
                  for e in _read_all(train, train.client_ids) + test_elements
                  if train.y_key in e]
        num_classes = max(max(labels, default=0) + 1, 2)
    train = dataclasses.replace(train, num_classes=num_classes)
    x_test, y_test = _as_xy(test_elements, f"test split of {name}", train.x_key, train.y_key,
                            train.x_shape, train.x_scale, num_classes)
    x0, _ = train.client(0)  # fail now, not in a worker, if elements do not decode
    if x0.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{name}: training inputs have shape {list(x0.shape[1:])} but test "
                        f"inputs {list(x_test.shape[1:])}")
    from fedsim.tasks.classification import Classification

    return FederatedData(train=train, x_test=x_test, y_test=y_test, num_classes=num_classes,
                         input_shape=tuple(int(n) for n in x0.shape[1:]), name="tff_client_data",
                         task=Classification())


def load_sql_client_data(path: os.PathLike | str, clients: Optional[int] = None, *,
                         x_key: str = "pixels", y_key: str = "label",
                         x_shape: Optional[Sequence[int]] = None,
                         num_classes: Optional[int] = None, train_split: Optional[str] = None,
                         test_split: Optional[str] = None, test_fraction: float = 0.2,
                         x_scale: float = 1.0, seed: int = 0) -> FederatedData:
    """A ``SqlClientData`` sqlite file as a :class:`~fedsim.data.base.FederatedData`
    (module docstring).

    clients: how many (None: every client id of the training split).
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise DataError(f"data.path: file not found: {file} (data=tff_client_data reads a "
                        "local SqlClientData file; nothing is downloaded)")
    _check_database(file)
    exclude = test_split if train_split is None else None
    ids = _client_ids(file, train_split, exclude)
    if test_split is None:
        # Held-out clients: other ids, the same rows filter as training.
        ids, test_ids = _holdout(ids, test_fraction, seed)
        test_filter: tuple[Optional[str], Optional[str]] = (train_split, exclude)
    else:
        test_ids = _client_ids(file, test_split, None)
        test_filter = (test_split, None)
        if not test_ids:
            raise DataError(f"data.test_split={test_split!r}: no clients with examples in that "
                            f"split of {file}")
    if not ids:
        raise DataError(f"data.train_split={train_split!r}: no clients with examples in {file}")
    chosen = _select(ids, clients, str(file))
    own_tests = False
    if test_split is not None:
        test_ids = _test_ids(test_ids, chosen)
        own_tests = bool(set(test_ids) & set(chosen))
    shape = tuple(int(n) for n in x_shape) if x_shape is not None else None
    train: SqlTFFClientData
    if own_tests:  # the clients' own test rows (EMNIST): the client_test capability
        assert test_split is not None
        train = SqlTFFClientDataWithTest(str(file), tuple(chosen), x_key, y_key, shape,
                                         num_classes or 0, x_scale, train_split, exclude,
                                         test_split)
    else:
        train = SqlTFFClientData(str(file), tuple(chosen), x_key, y_key, shape,
                                 num_classes or 0, x_scale, train_split, exclude)
    test = SqlTFFClientData(str(file), (), x_key, y_key, shape, num_classes or 0, x_scale,
                            *test_filter)
    return _finish(train, test, test_ids, str(file), num_classes)


def load_tff_client_data(client_data: Any, clients: Optional[int] = None, *,
                         test_data: Any = None, x_key: str = "pixels", y_key: str = "label",
                         x_shape: Optional[Sequence[int]] = None,
                         num_classes: Optional[int] = None, test_fraction: float = 0.2,
                         x_scale: float = 1.0, seed: int = 0) -> FederatedData:
    """A TFF ``ClientData`` object (or a ``SqlClientData`` file path) as
    :class:`~fedsim.data.base.FederatedData`, ready for :func:`fedsim.simulation`.

    client_data: a path, a ``tff.simulation.datasets.SqlClientData`` (read lazily from
    its file), or any other ``ClientData`` (shipped to the workers; it must pickle).
    test_data: the test ``ClientData`` (e.g. the second value of a TFF ``load_data``);
    None holds out ``test_fraction`` of the client ids (at least one, seeded).
    x_shape: None keeps each element's shape, with a channel axis appended to 2-D
    (grayscale image) inputs of ClientData objects.
    """
    if isinstance(client_data, (str, os.PathLike)):
        return load_sql_client_data(client_data, clients, x_key=x_key, y_key=y_key,
                                    x_shape=x_shape, num_classes=num_classes,
                                    test_fraction=test_fraction, x_scale=x_scale, seed=seed)
    from tensorflow_federated.python.simulation.datasets.sql_client_data import SqlClientData

    def as_source(cd: Any, ids: Sequence[str], shape: Optional[tuple[int, ...]]) -> Any:
        if isinstance(cd, SqlClientData):
            return SqlTFFClientData(str(Path(cd._filepath).resolve()), tuple(ids), x_key, y_key,
                                    shape, num_classes or 0, x_scale, cd._split_name)
        return ObjectTFFClientData(cd, tuple(ids), x_key, y_key, shape, num_classes or 0,
                                   x_scale)

    ids = sorted(str(c) for c in client_data.client_ids)
    if test_data is None:
        ids, test_ids = _holdout(ids, test_fraction, seed)
        test_cd = client_data
    else:
        test_ids = sorted(str(c) for c in test_data.client_ids)
        test_cd = test_data
    chosen = _select(ids, clients, type(client_data).__name__)
    shape = tuple(int(n) for n in x_shape) if x_shape is not None else None
    train = as_source(client_data, chosen, shape)
    if shape is None and isinstance(train, ObjectTFFClientData):
        spec = client_data.element_type_structure
        if isinstance(spec, Mapping) and x_key in spec:
            dims = tuple(spec[x_key].shape)
            if all(d is not None for d in dims):
                shape = dims + (1,) if len(dims) == 2 else dims
                train = as_source(client_data, chosen, shape)
    test = as_source(test_cd, (), shape)
    if isinstance(train, ObjectTFFClientData):
        import pickle

        try:
            pickle.dumps(train)
        except Exception as err:
            try:
                import cloudpickle

                cloudpickle.dumps(train)
            except Exception:
                raise DataError(f"the ClientData object ({type(client_data).__name__}) cannot be "
                                f"pickled to ship it to the workers ({type(err).__name__}: "
                                f"{err})") from err
    if test_data is None:
        return _finish(train, test, test_ids, type(client_data).__name__, num_classes)
    return _finish(train, test, _test_ids(test_ids, chosen), type(client_data).__name__,
                   num_classes)


def load_tff_data(cfg: DataConfig, clients: int, seed: int) -> FederatedData:
    """``data=tff_client_data``: a TFF dataset from TFF's cache, or a custom file."""
    if cfg.tff_dataset is None:
        assert cfg.path is not None  # (DataConfig requires data.path without tff_dataset)
        return load_sql_client_data(cfg.path, clients, x_key=cfg.x_key, y_key=cfg.y_key,
                                    x_shape=cfg.x_shape, num_classes=cfg.num_classes,
                                    train_split=cfg.train_split, test_split=cfg.test_split,
                                    test_fraction=cfg.test_fraction, seed=seed)
    spec = TFF_DATASETS[cfg.tff_dataset]
    y_key, num_classes = spec.y_key, spec.num_classes
    if cfg.tff_dataset == "cifar100" and cfg.cifar100_label == "coarse_label":
        y_key, num_classes = "coarse_label", 20  # cifar100.load_data()'s 20 superclasses
    file = find_tff_file(cfg.tff_dataset, cfg.path)
    return load_sql_client_data(file, clients, x_key=spec.x_key, y_key=y_key,
                                x_shape=cfg.x_shape or spec.x_shape,
                                num_classes=num_classes, train_split=spec.train_split,
                                test_split=spec.test_split, x_scale=spec.x_scale, seed=seed)

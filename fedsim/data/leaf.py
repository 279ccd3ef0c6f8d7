"""LEAF's federated benchmarks from their JSON files (``data=leaf``).

``data.path`` is the dataset's ``data`` directory, holding ``train/`` and
``test/`` directories of ``*.json`` files as LEAF's ``preprocess.sh`` (its
``split_data``) writes them, or a directory above it (``<path>/data`` or
``<path>/<leaf_dataset>/data``). Each file is LEAF's schema::

    {"users": [...], "num_samples": [...], "hierarchies": [...] (optional),
     "user_data": {user: {"x": [...], "y": [...]}}}

LEAF splits every user's samples into train and test (the same user ids), so
clients are the users with training samples, sorted, as clients
``0..clients-1``; ``client_test(cid)`` is that user's test samples (empty when
it has none) and the global test split is the test samples of the selected
users. Nothing is downloaded; a missing directory is a :class:`DataError`.

``data.leaf_dataset``:

- ``femnist``: x 784 floats per sample -> float32 ``(28, 28, 1)`` (values as
  stored); y the class, int32 in ``[0, 62)``; ``Classification()``.
- ``shakespeare``: x an 80-character string -> int32 ids ``(80,)`` by LEAF's
  ``word_to_indices`` (``ALL_LETTERS.find``, ``models/utils/language_utils.py``);
  y the next character's id, int32; ``Classification()`` with
  ``num_classes = len(ALL_LETTERS)`` = 80. A character outside ``ALL_LETTERS``
  (where LEAF's ``find`` gives -1, an invalid embedding index) is a DataError.
- ``sent140``: x LEAF's ``row[1:]`` of the Sentiment140 CSV, ``[id, date, query,
  user, text]``; the tweet is ``x[4]`` (LEAF's ``process_x``). It is split with
  LEAF's ``split_line`` (``re.findall(r"[\\w']+|[.,!?;]", line)``) and, as
  ``line_to_indices``, truncated to ``data.sequence_length`` words (default 25,
  LEAF's ``max_words``). LEAF maps words through GloVe's vocabulary; fedsim
  builds one from the words of ALL training users (every file of ``train/``):
  the ``data.vocab_size`` most frequent (ties by word), ids ``1..V``, pad 0
  (short tweets are padded with 0 where LEAF repeats its unknown id), out of
  vocabulary ``V + 1``: x int32 ``(sequence_length,)``, an embedding needs
  ``V + 2`` rows. y 0/1 int32; ``Binary()`` (``num_classes`` 1).

Workers stay lazy: :class:`LeafClientData` holds the file names of each
selected user (and sent140's vocabulary); a worker parses a file when one of
its users is asked for, keeping the last two parsed files per process.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from fedsim.config import DataConfig
from fedsim.data.base import FederatedData, own_test_split
from fedsim.errors import ConfigError, DataError

# LEAF models/utils/language_utils.py
ALL_LETTERS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
               "abcdefghijklmnopqrstuvwxyz}")
NUM_LETTERS = len(ALL_LETTERS)
FEMNIST_CLASSES = 62
SENT140_SEQUENCE_LENGTH = 25  # line_to_indices(max_words=25)
_SPLIT_LINE = re.compile(r"[\w']+|[.,!?;]")


def split_line(line: str) -> list[str]:
    """LEAF's ``split_line``: the words and punctuation marks of a phrase."""
    return _SPLIT_LINE.findall(line)


def word_to_indices(word: str) -> list[int]:
    """LEAF's ``word_to_indices``: ``ALL_LETTERS.find`` of each character."""
    return [ALL_LETTERS.find(c) for c in word]


# ----------------------------------------------------------------------------- files


def leaf_root(path: str, dataset: str) -> Path:
    """The directory holding ``train/`` and ``test/``: ``path``, ``path/data`` or
    ``path/<dataset>/data``; DataError naming ``path/train`` otherwise."""
    base = Path(path).expanduser()
    for root in (base, base / "data", base / dataset / "data"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    missing = base / "train" if not (base / "train").is_dir() else base / "test"
    raise DataError(f"data.path: directory not found: {missing} (data=leaf reads the "
                    f"train/ and test/ *.json files of LEAF's {dataset} data directory, "
                    "written by its preprocess.sh; nothing is downloaded)")


@lru_cache(maxsize=2)
def _user_data(path: str, mtime: int) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"data.path: malformed file {path}: not JSON ({err})") from err
    users = doc.get("user_data") if isinstance(doc, dict) else None
    if not isinstance(users, dict) or not isinstance(doc.get("users"), list):
        raise DataError(f"data.path: malformed file {path}: expected LEAF's "
                        "{\"users\": [...], \"num_samples\": [...], \"user_data\": "
                        "{user: {\"x\": [...], \"y\": [...]}}}")
    for user, d in users.items():
        if (not isinstance(d, dict) or not isinstance(d.get("x"), list)
                or not isinstance(d.get("y"), list) or len(d["x"]) != len(d["y"])):
            raise DataError(f"data.path: malformed file {path}: user {user!r} needs lists "
                            "'x' and 'y' of one length")
    return users


def user_data(path: str) -> dict[str, Any]:
    """``user_data`` of one LEAF JSON file (the last two files parsed are kept)."""
    return _user_data(path, os.stat(path).st_mtime_ns)


def _index(directory: Path) -> dict[str, list[str]]:
    """user -> the files of ``directory`` holding samples of that user."""
    files = sorted(str(p) for p in directory.glob("*.json"))
    out: dict[str, list[str]] = {}
    for file in files:
        for user, d in user_data(file).items():
            if d["y"]:
                out.setdefault(str(user), []).append(file)
    return out


def _samples(files: Sequence[str], user: str) -> tuple[list[Any], list[Any]]:
    xs: list[Any] = []
    ys: list[Any] = []
    for file in files:
        d = user_data(file).get(user)
        if d is not None:
            xs += d["x"]
            ys += d["y"]
    return xs, ys


# ----------------------------------------------------------------------------- conversion


def _ids(vocab: Sequence[str]) -> dict[str, int]:
    return {w: i + 1 for i, w in enumerate(vocab)}


@lru_cache(maxsize=4)
def _vocab_table(vocab: tuple[str, ...]) -> dict[str, int]:
    return _ids(vocab)


def sent140_indices(text: str, vocab: tuple[str, ...], sequence_length: int) -> np.ndarray:
    """A tweet as int32 ids ``(sequence_length,)``: LEAF's ``line_to_indices``
    with pad 0, words ``1..V``, out of vocabulary ``V + 1`` (module docstring)."""
    table = _vocab_table(vocab)
    oov = len(vocab) + 1
    out = np.zeros(sequence_length, np.int32)
    ids = [table.get(w, oov) for w in split_line(text)[:sequence_length]]
    out[:len(ids)] = ids
    return out


def sent140_vocab(texts: Sequence[str], vocab_size: int) -> tuple[str, ...]:
    """The ``vocab_size`` most frequent words of ``texts`` (ties by word)."""
    counts = Counter(w for t in texts for w in split_line(t))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(w for w, _ in ranked[:vocab_size])


def _tweet(x: Any, where: str) -> str:
    if not isinstance(x, list) or len(x) < 5 or not isinstance(x[4], str):
        raise DataError(f"{where}: a sent140 sample x must be LEAF's [id, date, query, user, "
                        f"text] (the tweet at index 4), got {str(x)[:80]}")
    return x[4]


def _letters(s: Any, where: str) -> list[int]:
    if not isinstance(s, str):
        raise DataError(f"{where}: LEAF shakespeare samples are strings, got {type(s).__name__}")
    ids = word_to_indices(s)
    if -1 in ids:
        bad = s[ids.index(-1)]
        raise DataError(f"{where}: character {bad!r} is not in LEAF's ALL_LETTERS")
    return ids


@dataclass(frozen=True)
class LeafClientData:
    """LEAF users as fedsim's ClientData: per selected user the train and test
    files holding it; samples are parsed on request (module docstring).

    dataset: femnist, shakespeare or sent140. x_length: shakespeare's input
    length (as stored). vocab, sequence_length: sent140's vocabulary and length.
    """

    dataset: str
    users: tuple[str, ...]
    train_files: tuple[tuple[str, ...], ...]
    test_files: tuple[tuple[str, ...], ...]
    x_length: int = 80
    vocab: tuple[str, ...] = ()
    sequence_length: int = SENT140_SEQUENCE_LENGTH

    @property
    def num_clients(self) -> int:
        return len(self.users)

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self.users

    def convert(self, xs: list[Any], ys: list[Any], where: str) -> tuple[np.ndarray, np.ndarray]:
        """LEAF samples -> fedsim's ``(x, y)`` arrays (module docstring)."""
        try:
            if self.dataset == "femnist":
                x = np.asarray(xs, np.float32).reshape(len(xs), 28, 28, 1)
                y = np.asarray(ys, np.int64).reshape(len(ys))
                if len(y) and (y.min() < 0 or y.max() >= FEMNIST_CLASSES):
                    raise DataError(f"{where}: femnist labels outside 0..61")
                return x, y.astype(np.int32)
            if self.dataset == "shakespeare":
                rows = [_letters(s, where) for s in xs]
                if any(len(r) != self.x_length for r in rows):
                    raise DataError(f"{where}: shakespeare inputs must all have "
                                    f"{self.x_length} characters")
                labels = [_letters(c, where) for c in ys]
                if any(len(c) != 1 for c in labels):
                    raise DataError(f"{where}: shakespeare labels must be single characters")
                return (np.asarray(rows, np.int32).reshape(len(rows), self.x_length),
                        np.asarray([c[0] for c in labels], np.int32))
            x = np.stack([sent140_indices(_tweet(s, where), self.vocab, self.sequence_length)
                          for s in xs]) if xs else np.zeros((0, self.sequence_length), np.int32)
            y = np.asarray(ys, np.int64).reshape(len(ys))
            if len(y) and not np.isin(y, (0, 1)).all():
                raise DataError(f"{where}: sent140 labels must be 0 or 1")
            return x, y.astype(np.int32)
        except (ValueError, TypeError) as err:
            raise DataError(f"{where}: malformed {self.dataset} samples ({err})") from err

    def _read(self, cid: int, files: tuple[tuple[str, ...], ...],
              split: str) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range [0, {self.num_clients})")
        user = self.users[cid]
        xs, ys = _samples(files[cid], user)
        return self.convert(xs, ys, f"LEAF {self.dataset} {split} user {user!r}")

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """User ``cid``'s training samples."""
        return self._read(cid, self.train_files, "train")

    def client_test(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """The same user's test samples (zero-length when it has none)."""
        return self._read(cid, self.test_files, "test")


def load_leaf(cfg: DataConfig, clients: Optional[int]) -> FederatedData:
    """``data=leaf`` (module docstring)."""
    assert cfg.path is not None and cfg.leaf_dataset is not None  # DataConfig checks both
    dataset = cfg.leaf_dataset
    root = leaf_root(cfg.path, dataset)
    train_index, test_index = _index(root / "train"), _index(root / "test")
    users = sorted(train_index)
    if not users:
        raise DataError(f"data.path: no users with samples in {root / 'train'}/*.json "
                        "(LEAF's train split)")
    if clients is not None and clients > len(users):
        raise ConfigError("clients", f"at most the {len(users)} LEAF users with training "
                          f"samples in {root / 'train'}", clients)
    chosen = tuple(users[:clients] if clients is not None else users)
    vocab: tuple[str, ...] = ()
    length = cfg.sequence_length or SENT140_SEQUENCE_LENGTH
    x_length = 80
    if dataset == "sent140":  # vocabulary of every training user's tweets
        texts = [_tweet(x, f"{f}: user {u!r}") for u, files in train_index.items()
                 for f in files for x in user_data(f)[u]["x"]]
        vocab = sent140_vocab(texts, cfg.vocab_size)
    elif dataset == "shakespeare":
        first = _samples(train_index[chosen[0]], chosen[0])[0][0]
        x_length = len(first) if isinstance(first, str) else 80
    train = LeafClientData(dataset, chosen, tuple(tuple(train_index[u]) for u in chosen),
                           tuple(tuple(test_index.get(u, ())) for u in chosen), x_length,
                           vocab, length)
    x_test, y_test = own_test_split(train)
    if len(y_test) == 0:
        raise DataError(f"data.path: the selected LEAF users have no samples in "
                        f"{root / 'test'}/*.json (LEAF's test split of the same users)")
    train.client(0)  # fail now, not in a worker, if the samples do not convert
    task: Any
    if dataset == "sent140":
        from fedsim.tasks.binary import Binary

        task, num_classes = Binary(), 1
    else:
        from fedsim.tasks.classification import Classification

        task = Classification()
        num_classes = FEMNIST_CLASSES if dataset == "femnist" else NUM_LETTERS
    return FederatedData(train=train, x_test=x_test, y_test=y_test, num_classes=num_classes,
                         input_shape=tuple(int(n) for n in x_test.shape[1:]), name=cfg.name,
                         task=task)

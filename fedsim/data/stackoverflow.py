"""TFF's federated StackOverflow (``data=tff_client_data data.tff_dataset=stackoverflow``):
next-word prediction (``data.stackoverflow_task=nwp``) or tag prediction (``tp``),
as TFF's baselines preprocess them.

Files (nothing is downloaded), in ``data.path`` (TFF's cache directory; null:
``~/.tff``) or next to the sqlite file ``data.path`` names:

- ``stackoverflow.sqlite``: the ``SqlClientData`` database of
  ``tff.simulation.datasets.stackoverflow.load_data`` (splits ``train``,
  ``heldout``, ``test``; ``tf.train.Example`` features ``tokens``, ``title``,
  ``tags``, ``creation_date``, ``type`` (bytes) and ``score`` (int64)).
- ``stackoverflow.word_count``: one ``word count`` pair per line, most frequent
  first, read as ``stackoverflow.load_word_counts(vocab_size=...)`` reads it
  (the first ``vocab_size`` distinct words).
- ``stackoverflow.tag_count`` (``tp`` only): a JSON object ``{tag: count}``,
  ordered as ``stackoverflow.load_tag_counts()`` orders it (by count,
  decreasing, ties in file order); the first ``tag_vocab_size`` tags.

(Both vocabulary files are also found in ``<dir>/datasets/``, where
``tf.keras.utils.get_file(cache_dir=<dir>)`` extracts them.)

``nwp`` reproduces ``word_prediction_preprocessing.build_to_ids_fn`` and
``batch_and_split`` (TFF 0.87; one out-of-vocabulary bucket): per element, the
``tokens`` string split on single spaces (``tf.strings.split(sep=' ')``),
truncated to ``sequence_length`` words, each word its vocabulary index + 1 (out
of vocabulary: ``V + 1``), ``eos`` appended when shorter than
``sequence_length``, ``bos`` prepended, zero-padded to ``sequence_length + 1``;
``x = seq[:-1]``, ``y = seq[1:]``. Special tokens as ``get_special_tokens(V)``:
pad 0, oov ``V + 1``, bos ``V + 2``, eos ``V + 3``. x, y int32
``(n, sequence_length)`` (default 20); ``num_classes = V + 4`` (TFF's
``extended_vocab_size``); task ``NextTokenPrediction(pad=0, oov=(V + 1,),
eos=V + 3)``.

``tp`` reproduces ``tag_prediction_preprocessing.build_to_ids_fn``: the words of
``tokens + ' ' + title`` (whitespace split) counted over the word vocabulary
(out-of-vocabulary words dropped) and divided by their total
(``divide_no_nan``): x float32 ``(n, V)``; the ``|``-separated ``tags`` counted
over the tag vocabulary (others dropped): y float32 ``(n, K)`` (multi-hot; a
tag listed twice counts 2, as TFF's sum of one-hots). ``num_classes = K``; task
``MultiLabel(top_k=5)`` (TFF's ``Recall(top_k=5)``).

Clients are the sorted client ids with ``train`` rows; ``client_test(cid)`` is
that id's ``test`` rows (empty when it has none; ``heldout`` is not used). The
global test split is the ``test`` rows of the selected clients, in client
order, at most ``data.max_test_examples`` (default 10000; note a ``tp`` example
is ``4 * V`` bytes); when they have none, the first ``max_test_examples`` rows
of the whole ``test`` split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fedsim.config import DataConfig
from fedsim.data.base import FederatedData
from fedsim.data.tff import (
    check_database,
    client_rows,
    find_tff_file,
    parse_example_features,
    select_train_ids,
    split_rows,
)
from fedsim.errors import DataError

WORD_COUNT_FILE = "stackoverflow.word_count"
TAG_COUNT_FILE = "stackoverflow.tag_count"
DEFAULT_SEQUENCE_LENGTH = 20  # baselines.stackoverflow.constants.DEFAULT_SEQUENCE_LENGTH
TRAIN_SPLIT, TEST_SPLIT = "train", "test"


# ----------------------------------------------------------------------------- vocabularies


def vocab_file(directory: Path, name: str) -> Path:
    """``directory/name``, or ``directory/datasets/name`` (Keras' get_file cache)
    when only that exists; DataError naming the first when neither does."""
    for candidate in (directory / name, directory / "datasets" / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"data.path: file not found: {directory / name} (data.tff_dataset="
                    f"stackoverflow reads the vocabulary {name} next to stackoverflow.sqlite, "
                    f"as extracted from TFF's {name}.tar.bz2; nothing is downloaded)")


@lru_cache(maxsize=8)
def _word_vocab(path: str, vocab_size: int, mtime: int) -> tuple[str, ...]:
    words: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise DataError(f"data.path: malformed file {path}: line {number} is not "
                                    f"'word count' (TFF's load_word_counts format)")
                words[parts[0]] = int(parts[1])
                if len(words) >= vocab_size:
                    break
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data.path: malformed file {path}: {err}") from err
    if not words:
        raise DataError(f"data.path: malformed file {path}: no words")
    return tuple(words)


def load_word_vocab(path: os.PathLike | str, vocab_size: int) -> tuple[str, ...]:
    """The first ``vocab_size`` words of a ``stackoverflow.word_count`` file, as
    ``list(stackoverflow.load_word_counts(vocab_size=vocab_size).keys())``."""
    return _word_vocab(str(path), int(vocab_size), os.stat(path).st_mtime_ns)


@lru_cache(maxsize=8)
def _tag_vocab(path: str, tag_vocab_size: int, mtime: int) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            counts = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"data.path: malformed file {path}: not JSON ({err})") from err
    if (not isinstance(counts, dict) or not counts
            or not all(isinstance(v, (int, float)) for v in counts.values())):
        raise DataError(f"data.path: malformed file {path}: expected a JSON object "
                        f"{{tag: count}} (TFF's load_tag_counts format)")
    ordered = sorted(counts.items(), key=lambda item: item[1], reverse=True)
    return tuple(tag for tag, _ in ordered[:tag_vocab_size])


def load_tag_vocab(path: os.PathLike | str, tag_vocab_size: int) -> tuple[str, ...]:
    """The ``tag_vocab_size`` most frequent tags of a ``stackoverflow.tag_count``
    file, as ``list(stackoverflow.load_tag_counts().keys())[:tag_vocab_size]``."""
    return _tag_vocab(str(path), int(tag_vocab_size), os.stat(path).st_mtime_ns)


@lru_cache(maxsize=8)
def _table(vocab: tuple[str, ...]) -> dict[bytes, int]:
    return {w.encode("utf-8"): i for i, w in enumerate(vocab)}


def special_tokens(vocab_size: int) -> tuple[int, int, int, int]:
    """``(pad, oov, bos, eos)`` of ``word_prediction_preprocessing.
    get_special_tokens(vocab_size, num_out_of_vocab_buckets=1)``."""
    return 0, vocab_size + 1, vocab_size + 2, vocab_size + 3


# ----------------------------------------------------------------------------- preprocessing


def nwp_sequence(tokens: bytes, vocab: tuple[str, ...], sequence_length: int) -> np.ndarray:
    """``bos + ids (+ eos)`` padded to ``sequence_length + 1``, int32
    (``word_prediction_preprocessing.build_to_ids_fn`` then ``padded_batch``)."""
    table = _table(vocab)
    v = len(vocab)
    _, oov, bos, eos = special_tokens(v)
    ids = [table.get(w, v) + 1 for w in tokens.split(b" ")[:sequence_length]]
    if len(ids) < sequence_length:
        ids.append(eos)
    seq = np.zeros(sequence_length + 1, np.int32)
    seq[0] = bos
    seq[1:1 + len(ids)] = ids
    return seq


def tp_example(tokens: bytes, title: bytes, tags: bytes, vocab: tuple[str, ...],
               tag_vocab: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Bag of words (float32 ``(V,)``) and tag counts (float32 ``(K,)``), as
    ``tag_prediction_preprocessing.build_to_ids_fn``."""
    table, tag_table = _table(vocab), _table(tag_vocab)
    v, k = len(vocab), len(tag_vocab)
    words = [table[w] for w in (tokens + b" " + title).split() if w in table]
    counts = np.bincount(np.asarray(words, np.int64), minlength=v).astype(np.float32)
    total = counts.sum(dtype=np.float32)
    x = counts / total if total > 0 else np.zeros(v, np.float32)
    found = [tag_table[t] for t in tags.split(b"|") if t in tag_table]
    y = np.bincount(np.asarray(found, np.int64), minlength=k).astype(np.float32)
    return x.astype(np.float32), y


def _element(row: bytes, keys: tuple[str, ...], where: str) -> dict[str, bytes]:
    try:
        feats = parse_example_features(row, keys)
    except (ValueError, IndexError) as err:
        raise DataError(f"data.path: malformed file {where}: {err}") from err
    out = {}
    for key in keys:
        value = feats.get(key)
        if not isinstance(value, list) or len(value) != 1:
            raise DataError(f"data.path: malformed file {where}: each element needs one bytes "
                            f"feature {key!r} (TFF's stackoverflow.sqlite schema)")
        out[key] = value[0]
    return out


# ----------------------------------------------------------------------------- ClientData


@dataclass(frozen=True)
class StackOverflowClientData:
    """TFF StackOverflow's users as fedsim's ClientData. Holds the paths, the
    selected ids and the preprocessing parameters; each worker reads rows and
    the vocabularies (cached per process) on request."""

    path: str
    client_ids: tuple[str, ...]
    task: str
    word_count_path: str
    tag_count_path: Optional[str]
    vocab_size: int = 10000
    tag_vocab_size: int = 500
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def vocab(self) -> tuple[str, ...]:
        return load_word_vocab(self.word_count_path, self.vocab_size)

    @property
    def tag_vocab(self) -> tuple[str, ...]:
        assert self.tag_count_path is not None
        return load_tag_vocab(self.tag_count_path, self.tag_vocab_size)

    def rows_to_xy(self, rows: list[bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
        """Serialized elements -> ``(x, y)`` as the task preprocesses them."""
        vocab = self.vocab
        if self.task == "nwp":
            length = self.sequence_length
            if not rows:
                empty = np.zeros((0, length), np.int32)
                return empty, empty.copy()
            seqs = np.stack([nwp_sequence(_element(r, ("tokens",), where)["tokens"], vocab,
                                          length) for r in rows])
            return seqs[:, :-1].copy(), seqs[:, 1:].copy()
        tag_vocab = self.tag_vocab
        if not rows:
            return (np.zeros((0, len(vocab)), np.float32),
                    np.zeros((0, len(tag_vocab)), np.float32))
        pairs = []
        for r in rows:
            e = _element(r, ("tokens", "title", "tags"), where)
            pairs.append(tp_example(e["tokens"], e["title"], e["tags"], vocab, tag_vocab))
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _read(self, cid: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range [0, {self.num_clients})")
        name = self.client_ids[cid]
        return self.rows_to_xy(client_rows(self.path, name, split),
                               f"{self.path}: client {name!r}")

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """User ``cid``'s ``train`` rows, preprocessed."""
        return self._read(cid, TRAIN_SPLIT)

    def client_test(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """The same user's ``test`` rows (zero-length when it has none)."""
        return self._read(cid, TEST_SPLIT)


def task_of(train: StackOverflowClientData) -> tuple[Any, int]:
    """The task kind and ``num_classes`` (the model's output width)."""
    if train.task == "nwp":
        from fedsim.tasks.next_token import NextTokenPrediction

        v = len(train.vocab)
        pad, oov, _, eos = special_tokens(v)
        return NextTokenPrediction(pad=pad, oov=(oov,), eos=eos), v + 4
    from fedsim.tasks.multilabel import MultiLabel

    return MultiLabel(top_k=5), len(train.tag_vocab)


def load_stackoverflow(cfg: DataConfig, clients: Optional[int]) -> FederatedData:
    """``data.tff_dataset=stackoverflow`` (module docstring)."""
    file = find_tff_file("stackoverflow", cfg.path)
    check_database(file)
    words = vocab_file(file.parent, WORD_COUNT_FILE)
    tags = vocab_file(file.parent, TAG_COUNT_FILE) if cfg.stackoverflow_task == "tp" else None
    chosen = select_train_ids(file, TRAIN_SPLIT, clients, "client ids")
    train = StackOverflowClientData(
        str(file), chosen, cfg.stackoverflow_task, str(words), None if tags is None else str(tags),
        cfg.vocab_size, cfg.tag_vocab_size, cfg.sequence_length or DEFAULT_SEQUENCE_LENGTH)
    task, num_classes = task_of(train)
    cap = cfg.max_test_examples
    rows: list[bytes] = []
    for name in chosen:
        rows += client_rows(file, name, TEST_SPLIT)
        if cap is not None and len(rows) >= cap:
            break
    if not rows:  # none of the selected ids has test rows: the whole test split
        rows = split_rows(file, TEST_SPLIT, cap)
    if not rows:
        raise DataError(f"data.path: malformed file {file}: no rows in the {TEST_SPLIT!r} "
                        "split (TFF's stackoverflow.sqlite has train, heldout and test)")
    x_test, y_test = train.rows_to_xy(rows[:cap] if cap is not None else rows,
                                      f"{file}: test split")
    train.client(0)  # fail now, not in a worker, if the rows do not decode
    return FederatedData(train=train, x_test=x_test, y_test=y_test, num_classes=num_classes,
                         input_shape=tuple(int(n) for n in x_test.shape[1:]), name=cfg.name,
                         task=task)

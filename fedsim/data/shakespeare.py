"""TFF's federated Shakespeare (``data=tff_client_data data.tff_dataset=shakespeare``):
character next-token prediction, as TFF's baseline preprocesses it.

The file is ``shakespeare.sqlite``, the ``SqlClientData`` database that
``tff.simulation.datasets.shakespeare.load_data(cache_dir=...)`` caches (splits
``train`` and ``test``; each element a ``tf.train.Example`` with one bytes
feature ``snippets``). ``data.path`` is that cache directory (null: ``~/.tff``)
or the file itself; nothing is downloaded.

Preprocessing reproduces ``tff.simulation.baselines.shakespeare.
char_prediction_preprocessing.create_preprocess_fn`` (TFF 0.87), without its
shuffling, repetition and batching:

- ``_build_tokenize_fn``: each snippet's BYTES (``tf.strings.bytes_split``) are
  looked up in ``CHAR_VOCAB`` (86 characters) plus one: ids ``1..86``, any
  other byte the out-of-vocabulary id 87; then ``[bos] + ids + [eos]`` (88, 89)
  and zero padding (pad 0) up to a multiple of ``sequence_length + 1``
  (``get_special_tokens``: ``pad, oov, bos, eos = 0, 87, 88, 89``);
- ``unbatch().batch(sequence_length + 1, drop_remainder=True)``: consecutive
  windows of ``sequence_length + 1`` tokens (never across snippets, each being
  padded to a whole number of windows);
- ``_split_target``: ``x = window[:-1]``, ``y = window[1:]``.

x and y are int32 ``(n, sequence_length)`` (``data.sequence_length``, default
80, TFF's ``DEFAULT_SEQUENCE_LENGTH``); ``num_classes`` is TFF's
``char_prediction_tasks.VOCAB_LENGTH`` = 86 + 4 = 90; the task is
``NextTokenPrediction(pad=0, oov=(87,), eos=89)``.

Clients are the speaking roles (sorted client ids) with rows in ``train``;
``client_test(cid)`` is the same role's ``test`` rows; the global test split is
the ``test`` rows of the selected roles (every role has both, as TFF's
``load_data`` says).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from fedsim.config import DataConfig
from fedsim.data.base import FederatedData, own_test_split
from fedsim.data.tff import (
    check_database,
    client_rows,
    find_tff_file,
    parse_example_features,
    select_train_ids,
)
from fedsim.errors import DataError

# tff.simulation.baselines.shakespeare.char_prediction_preprocessing.CHAR_VOCAB (TFF 0.87)
CHAR_VOCAB: tuple[str, ...] = tuple(
    'dhlptx@DHLPTX'
    ' $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r'
)
# char_prediction_preprocessing.get_special_tokens(): (pad, oov, bos, eos)
PAD, OOV, BOS, EOS = 0, len(CHAR_VOCAB) + 1, len(CHAR_VOCAB) + 2, len(CHAR_VOCAB) + 3
# char_prediction_tasks.VOCAB_LENGTH: the vocabulary with the 4 special tokens
VOCAB_LENGTH = len(CHAR_VOCAB) + 4
DEFAULT_SEQUENCE_LENGTH = 80  # char_prediction_preprocessing.DEFAULT_SEQUENCE_LENGTH
TRAIN_SPLIT, TEST_SPLIT = "train", "test"
FEATURE = "snippets"


def _byte_table() -> np.ndarray:
    """Token id of every byte value: CHAR_VOCAB's index + 1, else OOV."""
    table = np.full(256, OOV, np.int64)
    for i, c in enumerate(CHAR_VOCAB):
        table[ord(c)] = i + 1
    return table


_BYTE_TABLE = _byte_table()


def snippet_windows(snippet: bytes, sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> np.ndarray:
    """One snippet as TFF's ``_build_tokenize_fn`` then ``batch(sequence_length + 1)``
    make it: int32 windows ``(k, sequence_length + 1)``."""
    split = sequence_length + 1
    ids = _BYTE_TABLE[np.frombuffer(snippet, np.uint8)]
    tokens = np.concatenate([[BOS], ids, [EOS]]).astype(np.int32)
    pad = (-len(tokens)) % split
    tokens = np.concatenate([tokens, np.zeros(pad, np.int32)])
    return tokens.reshape(-1, split)


def snippets_to_xy(snippets: list[bytes],
                   sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Snippets -> ``(x, y)`` int32 ``(n, sequence_length)`` each (TFF's
    ``char_prediction_preprocessing``, unshuffled: module docstring)."""
    if not snippets:
        empty = np.zeros((0, sequence_length), np.int32)
        return empty, empty.copy()
    windows = np.concatenate([snippet_windows(s, sequence_length) for s in snippets])
    return windows[:, :-1].copy(), windows[:, 1:].copy()


def task() -> Any:
    """``NextTokenPrediction(pad=0, oov=(87,), eos=89)``, as TFF's
    ``char_prediction_tasks`` masks its accuracy (pad, and the others for the
    extended metrics)."""
    from fedsim.tasks.next_token import NextTokenPrediction

    return NextTokenPrediction(pad=PAD, oov=(OOV,), eos=EOS)


def _snippets(path: str, client_id: str, split: str) -> list[bytes]:
    out = []
    for row in client_rows(path, client_id, split):
        try:
            feats = parse_example_features(row, (FEATURE,))
        except (ValueError, IndexError) as err:
            raise DataError(f"data.path: malformed file {path}: client {client_id!r}: "
                            f"{err}") from err
        value = feats.get(FEATURE)
        if not isinstance(value, list) or len(value) != 1:
            raise DataError(f"data.path: malformed file {path}: client {client_id!r}: each "
                            f"element needs one bytes feature {FEATURE!r} (TFF's "
                            f"shakespeare.sqlite schema)")
        out.append(value[0])
    return out


@dataclass(frozen=True)
class ShakespeareClientData:
    """TFF Shakespeare's roles as fedsim's ClientData: the file's path, the
    selected role ids and the sequence length; rows are read on request."""

    path: str
    client_ids: tuple[str, ...]
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    def _read(self, cid: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range [0, {self.num_clients})")
        return snippets_to_xy(_snippets(self.path, self.client_ids[cid], split),
                              self.sequence_length)

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Role ``cid``'s ``train`` snippets as int32 ``(x, y)`` windows."""
        return self._read(cid, TRAIN_SPLIT)

    def client_test(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """The same role's ``test`` snippets (zero-length when it has none)."""
        return self._read(cid, TEST_SPLIT)


def load_shakespeare(cfg: DataConfig, clients: Optional[int]) -> FederatedData:
    """``data.tff_dataset=shakespeare`` (module docstring)."""
    file = find_tff_file("shakespeare", cfg.path)
    check_database(file)
    chosen = select_train_ids(file, TRAIN_SPLIT, clients, "roles",
                              " (TFF's shakespeare.sqlite has train and test)")
    length = cfg.sequence_length or DEFAULT_SEQUENCE_LENGTH
    train = ShakespeareClientData(str(file), chosen, length)
    x_test, y_test = own_test_split(train)
    if len(y_test) == 0:
        raise DataError(f"data.path: {file}: the selected roles have no rows in the "
                        f"{TEST_SPLIT!r} split (TFF's shakespeare.sqlite gives every role both)")
    train.client(0)  # fail now, not in a worker, if the rows do not decode
    return FederatedData(train=train, x_test=x_test, y_test=y_test, num_classes=VOCAB_LENGTH,
                         input_shape=(length,), name=cfg.name, task=task())

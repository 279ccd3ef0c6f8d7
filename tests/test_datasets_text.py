"""TFF's SqlClientData datasets from local files (fedsim.data.shakespeare,
fedsim.data.stackoverflow, the EMNIST/CIFAR-100 options of fedsim.data.tff):
tiny files in TFF's real schema (protos serialized by TensorFlow), ids checked
by hand and bit for bit against TFF's own preprocessing on tf.data."""

from __future__ import annotations

import collections
import json
import pickle
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DataConfig
from fedsim.data.loaders import load_federated_data
from fedsim.errors import ConfigError, DataError

# The statements of tff.simulation.datasets.save_to_sql_client_data (TFF 0.87).
_SCHEMA = (
    """CREATE TABLE examples (
       split_name TEXT NOT NULL,
       client_id TEXT NOT NULL,
       serialized_example_proto BLOB NOT NULL);""",
    """CREATE TABLE client_metadata (
       client_id TEXT NOT NULL,
       split_name TEXT NOT NULL,
       num_examples INTEGER NOT NULL);""",
)


def _feature(value):
    import tensorflow as tf

    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    arr = np.asarray(value)
    if np.issubdtype(arr.dtype, np.integer):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=arr.reshape(-1).tolist()))
    return tf.train.Feature(float_list=tf.train.FloatList(value=arr.reshape(-1).tolist()))


def write_sql(path: Path, rows) -> Path:
    """rows: (split_name, client_id, {feature: value}) in file order."""
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[tuple[str, str], int] = collections.Counter()
    with sqlite3.connect(path) as con:
        for q in _SCHEMA:
            con.execute(q)
        for split, cid, feats in rows:
            proto = tf.train.Example(features=tf.train.Features(
                feature={k: _feature(v) for k, v in feats.items()})).SerializeToString()
            con.execute("INSERT INTO examples (split_name, client_id, serialized_example_proto) "
                        "VALUES (?, ?, ?);", (split, cid, proto))
            counts[(cid, split)] += 1
        for (cid, split), n in counts.items():
            con.execute("INSERT INTO client_metadata (client_id, split_name, num_examples) "
                        "VALUES (?, ?, ?);", (cid, split, n))
    return path


def _spec():
    from tensorflow_federated.python.simulation.baselines import client_spec

    return client_spec.ClientSpec(num_epochs=1, batch_size=1000, shuffle_buffer_size=1)


def _collect(ds):
    """Concatenate a preprocessed dataset's (x, y) batches."""
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------- Shakespeare

LONG = b"To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer"
ROLES = {
    # (role, split): snippets; ids inserted unsorted, one role has test rows only
    ("THE_TEMPEST_PROSPERO", "train"): [b"Hi", LONG, b"x" * 79, "caf\u00e9 ~".encode()],
    ("THE_TEMPEST_PROSPERO", "test"): [b"Be"],
    ("HAMLET_HAMLET", "train"): [b"dH\n\r"],
    ("HAMLET_HAMLET", "test"): [b"Ay.", b"No!"],
    ("KING_LEAR_FOOL", "test"): [b"Nuncle"],
}


@pytest.fixture(scope="module")
def shakespeare_file(tmp_path_factory):
    rows = [(split, role, {"snippets": s}) for (role, split), snippets in ROLES.items()
            for s in snippets]
    return write_sql(tmp_path_factory.mktemp("tff") / "shakespeare.sqlite", rows)


def test_shakespeare_ids_by_hand_and_natural_split(shakespeare_file):
    from fedsim.data.shakespeare import BOS, CHAR_VOCAB, EOS, OOV, PAD, VOCAB_LENGTH
    from fedsim.tasks.next_token import NextTokenPrediction

    assert len(CHAR_VOCAB) == 86 and (PAD, OOV, BOS, EOS, VOCAB_LENGTH) == (0, 87, 88, 89, 90)
    fd = load_federated_data(DataConfig(name="tff_client_data", tff_dataset="shakespeare",
                                        path=str(shakespeare_file.parent)), clients=2, seed=0)
    assert fd.train.client_ids == ("HAMLET_HAMLET", "THE_TEMPEST_PROSPERO")  # sorted, train only
    assert fd.num_classes == 90 and fd.input_shape == (80,)
    assert isinstance(fd.task, NextTokenPrediction)
    assert (fd.task.pad, fd.task.oov, fd.task.eos) == (0, (87,), 89)
    assert fd.example.input_dtype == "int32" and fd.example.label_shape == (80,)
    x, y = fd.train.client(0)  # b"dH\n\r": 'd' is CHAR_VOCAB[0], 'H' [8], '\n' [62], '\r' [85]
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == (1, 80)
    window = [88, 1, 9, 63, 86, 89] + [0] * 75
    np.testing.assert_array_equal(x[0], window[:-1])
    np.testing.assert_array_equal(y[0], window[1:])
    x, y = fd.train.client(1)
    # "Hi" 1 window, LONG (85 chars + 2 = 87 tokens) 2, 79 x's exactly 1 (81 tokens), "café ~" 1
    assert x.shape == (5, 80)
    np.testing.assert_array_equal(x[3], [88] + [CHAR_VOCAB.index("x") + 1] * 79)
    assert y[3, -1] == 89  # eos is the last target, no padding
    cafe = x[4, :8].tolist()  # é is two bytes, each out of vocabulary; '~' too
    assert cafe == [88, *(CHAR_VOCAB.index(c) + 1 for c in "caf"), 87, 87, 14, 87]  # space is CHAR_VOCAB[13]
    # client_test: the same role's test rows; the global test: those of both roles
    xt, yt = fd.train.client_test(0)
    assert xt.shape == (2, 80) and xt[0, :5].tolist() == [88, CHAR_VOCAB.index("A") + 1,
                                                          CHAR_VOCAB.index("y") + 1,
                                                          CHAR_VOCAB.index(".") + 1, 89]
    assert fd.x_test.shape == (3, 80) and fd.y_test.dtype == np.int32
    assert len(pickle.dumps(fd.train)) < 1000
    with pytest.raises(ConfigError, match="clients=3"):
        load_federated_data(DataConfig(name="tff_client_data", tff_dataset="shakespeare",
                                       path=str(shakespeare_file)), clients=3, seed=0)


@pytest.mark.parametrize("length", [80, 5])
def test_shakespeare_matches_tff_char_prediction_preprocessing(shakespeare_file, length):
    import tensorflow as tf
    from tensorflow_federated.python.simulation.baselines.shakespeare import (
        char_prediction_preprocessing as tff_char,
    )

    from fedsim.data import shakespeare as ours

    assert ours.CHAR_VOCAB == tuple(tff_char.CHAR_VOCAB)
    assert (ours.PAD, ours.OOV, ours.BOS, ours.EOS) == tff_char.get_special_tokens()
    fd = load_federated_data(DataConfig(name="tff_client_data", tff_dataset="shakespeare",
                                        path=str(shakespeare_file), sequence_length=length),
                             clients=2, seed=0)
    preprocess = tff_char.create_preprocess_fn(_spec(), sequence_length=length)
    for cid, role in enumerate(fd.train.client_ids):
        for split, ours_xy in (("train", fd.train.client(cid)), ("test", fd.train.client_test(cid))):
            ds = tf.data.Dataset.from_tensor_slices(
                collections.OrderedDict(snippets=ROLES[(role, split)]))
            x, y = _collect(preprocess(ds))
            np.testing.assert_array_equal(ours_xy[0], x.astype(np.int32))
            np.testing.assert_array_equal(ours_xy[1], y.astype(np.int32))
            assert ours_xy[0].shape[1] == length


# ----------------------------------------------------------------------------- StackOverflow

WORDS = ["the", "to", "a", "python", "is", "."]
TAGS = {"python": 5, "java": 9, "c": 5, "sql": 1}  # load_tag_counts order: java, python, c, sql


def _post(tokens: bytes, title: bytes = b"a title", tags: bytes = b"python|java"):
    return {"creation_date": b"2010-01-08 09:34:05 UTC", "score": 3, "tags": tags,
            "title": title, "tokens": tokens, "type": b"answer"}


POSTS = {
    ("user_b", "train"): [_post(b"the python is ."), _post(b"the  cat to", b"", b"c|c|rust"),
                          _post(b" ".join([b"a"] * 30), b"python python", b"sql")],
    ("user_b", "test"): [_post(b"python to the")],
    ("user_a", "train"): [_post(b"", b"the", b"")],
    ("user_a", "heldout"): [_post(b"heldout rows are not used")],
    ("user_c", "test"): [_post(b"a a a", b"x", b"java")],
}


@pytest.fixture(scope="module")
def stackoverflow_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("so")
    rows = [(split, user, p) for (user, split), posts in POSTS.items() for p in posts]
    write_sql(d / "stackoverflow.sqlite", rows)
    (d / "stackoverflow.word_count").write_text(
        "".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)))
    (d / "stackoverflow.tag_count").write_text(json.dumps(TAGS))
    return d


def _so(d, **kw):
    return DataConfig(name="tff_client_data", tff_dataset="stackoverflow", path=str(d), **kw)


def test_stackoverflow_nwp_by_hand(stackoverflow_dir):
    from fedsim.tasks.next_token import NextTokenPrediction

    fd = load_federated_data(_so(stackoverflow_dir, vocab_size=5), clients=2, seed=0)
    # vocab: the to a python is (V=5): ids 1..5, oov 6, bos 7, eos 8; pad 0
    assert fd.train.client_ids == ("user_a", "user_b") and fd.num_classes == 9
    assert isinstance(fd.task, NextTokenPrediction)
    assert (fd.task.pad, fd.task.oov, fd.task.eos) == (0, (6,), 8)
    assert fd.input_shape == (20,) and fd.example.label_dtype == "int32"
    x, y = fd.train.client(1)
    assert x.shape == (3, 20) and x.dtype == np.int32
    first = [7, 1, 4, 5, 6, 8] + [0] * 15  # "." is 6th word: out of the 5-word vocabulary
    np.testing.assert_array_equal(x[0], first[:-1])
    np.testing.assert_array_equal(y[0], first[1:])
    np.testing.assert_array_equal(x[1, :6], [7, 1, 6, 6, 2, 8])  # "the  cat to": '' and cat oov
    np.testing.assert_array_equal(x[2], [7] + [3] * 19)  # 30 words: truncated, no eos
    np.testing.assert_array_equal(y[2], [3] * 20)
    xa, _ = fd.train.client(0)  # the empty post: bos, oov (the empty word), eos
    np.testing.assert_array_equal(xa[0, :4], [7, 6, 8, 0])
    # client_test: own test rows; user_a has none (heldout is not the test split)
    xt, yt = fd.train.client_test(1)
    np.testing.assert_array_equal(xt[0, :5], [7, 4, 2, 1, 8])
    e0, e1 = fd.train.client_test(0)
    assert e0.shape == (0, 20) and e1.dtype == np.int32
    assert fd.x_test.shape == (1, 20)  # the selected users' test rows
    assert len(pickle.dumps(fd.train)) < 1000


def test_stackoverflow_matches_tff_word_and_tag_preprocessing(stackoverflow_dir):
    import tensorflow as tf
    from tensorflow_federated.python.simulation.baselines.stackoverflow import (
        tag_prediction_preprocessing as tff_tag,
    )
    from tensorflow_federated.python.simulation.baselines.stackoverflow import (
        word_prediction_preprocessing as tff_word,
    )

    from fedsim.data.stackoverflow import load_tag_vocab, load_word_vocab

    d = stackoverflow_dir
    vocab = load_word_vocab(d / "stackoverflow.word_count", 5)
    tags = load_tag_vocab(d / "stackoverflow.tag_count", 3)
    assert vocab == ("the", "to", "a", "python", "is") and tags == ("java", "python", "c")
    nwp = load_federated_data(_so(d, vocab_size=5, sequence_length=7), clients=2, seed=0)
    tp = load_federated_data(_so(d, vocab_size=5, tag_vocab_size=3, stackoverflow_task="tp"),
                             clients=2, seed=0)
    word_fn = tff_word.create_preprocess_fn(_spec(), list(vocab), sequence_length=7)
    tag_fn = tff_tag.create_preprocess_fn(_spec(), list(vocab), list(tags))
    for cid, user in enumerate(nwp.train.client_ids):
        for split in ("train", "test"):
            posts = POSTS.get((user, split))
            if not posts:
                continue
            ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
                (k, [p[k] for p in posts]) for k in sorted(posts[0])))
            def read(fd, cid=cid, split=split):
                return fd.train.client(cid) if split == "train" else fd.train.client_test(cid)

            x, y = _collect(word_fn(ds))
            ox, oy = read(nwp)
            np.testing.assert_array_equal(ox, x.astype(np.int32))
            np.testing.assert_array_equal(oy, y.astype(np.int32))
            x, y = _collect(tag_fn(ds))
            ox, oy = read(tp)
            assert ox.dtype == np.float32 and oy.dtype == np.float32
            np.testing.assert_array_equal(ox, x)  # bit for bit
            np.testing.assert_array_equal(oy, y)
    # tp by hand: "the python is ." + " a title": the, python, is, a in vocabulary
    x, y = tp.train.client(1)
    np.testing.assert_array_equal(x[0], np.float32([1, 0, 1, 1, 1]) / np.float32(4))
    np.testing.assert_array_equal(y[0], [1, 1, 0])  # python|java
    np.testing.assert_array_equal(y[1], [0, 0, 2])  # c|c|rust: c twice, rust unknown
    assert tp.num_classes == 3 and tp.input_shape == (5,) and tp.task.top_k == 5
    from fedsim.tasks.multilabel import MultiLabel

    assert isinstance(tp.task, MultiLabel) and tp.example.label_shape == (3,)


def test_stackoverflow_global_test_fallback_cap_and_missing_files(stackoverflow_dir, tmp_path):
    d = stackoverflow_dir
    # user_a alone has no test rows: the whole test split (user_b, user_c), capped
    fd = load_federated_data(_so(d), clients=1, seed=0)
    assert fd.x_test.shape == (2, 20)
    fd = load_federated_data(_so(d, max_test_examples=1), clients=1, seed=0)
    assert fd.x_test.shape == (1, 20)
    fd = load_federated_data(_so(d / "stackoverflow.sqlite"), clients=2, seed=0)  # path: the file
    assert fd.num_classes == len(WORDS) + 4  # fewer words in the file than vocab_size
    with pytest.raises(DataError) as err:
        load_federated_data(_so(tmp_path), clients=1, seed=0)
    assert str(tmp_path / "stackoverflow.sqlite") in str(err.value)
    assert "nothing is downloaded" in str(err.value).lower()
    other = tmp_path / "so"
    other.mkdir()
    (other / "stackoverflow.sqlite").write_bytes((d / "stackoverflow.sqlite").read_bytes())
    with pytest.raises(DataError, match=str(other / "stackoverflow.word_count")):
        load_federated_data(_so(other), clients=1, seed=0)
    (other / "stackoverflow.word_count").write_text("the 3\n")
    with pytest.raises(DataError, match=str(other / "stackoverflow.tag_count")):
        load_federated_data(_so(other, stackoverflow_task="tp"), clients=1, seed=0)
    (other / "stackoverflow.tag_count").write_text("[1, 2]")
    with pytest.raises(DataError, match="malformed file"):
        load_federated_data(_so(other, stackoverflow_task="tp"), clients=1, seed=0)


def test_text_options_are_checked():
    for kw, option in (({"stackoverflow_task": "qa"}, "data.stackoverflow_task"),
                       ({"vocab_size": 0}, "data.vocab_size"),
                       ({"tag_vocab_size": 0}, "data.tag_vocab_size"),
                       ({"sequence_length": 0}, "data.sequence_length"),
                       ({"max_test_examples": 0}, "data.max_test_examples"),
                       ({"cifar100_label": "fine"}, "data.cifar100_label"),
                       ({"tff_dataset": "gldv2"}, "data.tff_dataset")):
        with pytest.raises(ConfigError, match=option):
            DataConfig(name="tff_client_data", **kw)


def test_missing_shakespeare_file_names_the_path(tmp_path):
    with pytest.raises(DataError) as err:
        load_federated_data(DataConfig(name="tff_client_data", tff_dataset="shakespeare",
                                       path=str(tmp_path)), clients=1, seed=0)
    assert str(tmp_path / "shakespeare.sqlite") in str(err.value)


# ----------------------------------------------------------------------------- EMNIST, CIFAR-100


def test_emnist_client_test_and_cifar100_coarse_labels(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("digits_only_train", 3), ("digits_only_test", 2)):
        for w in ("f0001_41", "f0000_14"):
            for _ in range(n):
                rows.append((split, w, {"label": int(rng.integers(0, 10)),
                                        "pixels": rng.random((28, 28)).astype(np.float32)}))
    rows.append(("digits_only_train", "f0002_00", {"label": 1,
                                                   "pixels": np.zeros((28, 28), np.float32)}))
    write_sql(tmp_path / "emnist_all.sqlite", rows)
    fd = load_federated_data(DataConfig(name="tff_client_data",
                                        tff_dataset="emnist_only_digits", path=str(tmp_path)),
                             clients=3, seed=0)
    assert fd.train.client_ids == ("f0000_14", "f0001_41", "f0002_00")
    x, y = fd.train.client_test(1)
    want = [r[2] for r in rows if r[:2] == ("digits_only_test", "f0001_41")]
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], [r["pixels"] for r in want])
    np.testing.assert_array_equal(y, [r["label"] for r in want])
    x, y = fd.train.client_test(2)  # a writer without test rows
    assert x.shape == (0, 28, 28, 1) and y.shape == (0,)
    assert len(fd.y_test) == 4 and type(fd.task).__name__ == "Classification"

    rows = []
    for split, ids in (("train", ("c0", "c1")), ("test", ("t0",))):
        for cid in ids:
            for _ in range(2):
                rows.append((split, cid, {"coarse_label": int(rng.integers(0, 20)),
                                          "image": rng.integers(0, 256, (32, 32, 3)),
                                          "label": int(rng.integers(0, 100))}))
    write_sql(tmp_path / "cifar100.sqlite", rows)
    fine = load_federated_data(DataConfig(name="tff_client_data", tff_dataset="cifar100",
                                          path=str(tmp_path)), clients=2, seed=0)
    coarse = load_federated_data(DataConfig(name="tff_client_data", tff_dataset="cifar100",
                                            path=str(tmp_path / "cifar100.sqlite"),
                                            cifar100_label="coarse_label"), clients=2, seed=0)
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert not hasattr(fine.train, "client_test")  # CIFAR-100's test clients are other ids
    _, y = coarse.train.client(0)
    np.testing.assert_array_equal(y, [r[2]["coarse_label"] for r in rows if r[1] == "c0"])
    np.testing.assert_array_equal(coarse.y_test, [r[2]["coarse_label"] for r in rows
                                                  if r[1] == "t0"])

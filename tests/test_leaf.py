"""LEAF's JSON benchmarks (fedsim.data.leaf): tiny train/ and test/ files in
LEAF's schema, ids checked by hand against LEAF's language_utils."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DataConfig
from fedsim.data.loaders import load_federated_data
from fedsim.errors import ConfigError, DataError

# LEAF models/utils/language_utils.py, verbatim
LEAF_ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


def write_leaf(root: Path, split: str, name: str, users: dict, hierarchies=None) -> None:
    d = root / split
    d.mkdir(parents=True, exist_ok=True)
    doc = {"users": list(users), "num_samples": [len(u["y"]) for u in users.values()],
           "user_data": users}
    if hierarchies is not None:
        doc["hierarchies"] = hierarchies
    (d / name).write_text(json.dumps(doc))


def _cfg(path, dataset, **kw):
    return DataConfig(name="leaf", leaf_dataset=dataset, path=str(path), **kw)


def test_femnist_natural_split_and_client_test(tmp_path):
    from fedsim.tasks.classification import Classification

    rng = np.random.default_rng(0)

    def samples(n):
        return {"x": rng.random((n, 784)).round(3).tolist(),
                "y": rng.integers(0, 62, n).tolist()}

    root = tmp_path / "femnist" / "data"
    train = {"f3_12": samples(3), "f0_01": samples(2)}
    write_leaf(root, "train", "all_data_0_niid_0_keep_0_train_9.json", train, ["a", "b"])
    write_leaf(root, "train", "all_data_1_niid_0_keep_0_train_9.json", {"f1_99": samples(4)})
    test = {"f3_12": samples(1), "f0_01": samples(2)}  # f1_99 has no test samples
    write_leaf(root, "test", "all_data_0_niid_0_keep_0_test_9.json", test)
    fd = load_federated_data(_cfg(tmp_path, "femnist"), clients=3, seed=0)  # a directory above
    assert fd.train.client_ids == ("f0_01", "f1_99", "f3_12")
    assert fd.num_classes == 62 and fd.input_shape == (28, 28, 1)
    assert isinstance(fd.task, Classification)
    x, y = fd.train.client(2)
    assert x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(x.reshape(3, 784), np.float32(train["f3_12"]["x"]))
    np.testing.assert_array_equal(y, train["f3_12"]["y"])
    xt, yt = fd.train.client_test(0)
    np.testing.assert_array_equal(yt, test["f0_01"]["y"])
    e, ey = fd.train.client_test(1)
    assert e.shape == (0, 28, 28, 1) and e.dtype == np.float32 and ey.shape == (0,)
    assert len(fd.y_test) == 3  # the selected users' test samples
    assert len(pickle.dumps(fd.train)) < 2000
    fd2 = load_federated_data(_cfg(root, "femnist"), clients=1, seed=0)  # the data dir itself
    assert fd2.train.client_ids == ("f0_01",) and len(fd2.y_test) == 2
    with pytest.raises(ConfigError, match="clients=4"):
        load_federated_data(_cfg(root, "femnist"), clients=4, seed=0)


def test_shakespeare_ids_are_leafs_letter_indices(tmp_path):
    from fedsim.data.leaf import ALL_LETTERS, word_to_indices

    assert ALL_LETTERS == LEAF_ALL_LETTERS and len(ALL_LETTERS) == 80
    line = ("To be, or not to be: that is the question. Whether 'tis nobler in the mind"
            " to su")
    assert len(line) == 80
    users = {"THE_TEMPEST_MIRANDA": {"x": [line, line[1:] + "f"], "y": ["f", "e"]},
             "HAMLET_OPHELIA": {"x": [line[::-1]], "y": ["\n"]}}
    write_leaf(tmp_path, "train", "shakespeare_train.json", users)
    write_leaf(tmp_path, "test", "shakespeare_test.json",
               {"THE_TEMPEST_MIRANDA": {"x": [line], "y": ["}"]}})
    fd = load_federated_data(_cfg(tmp_path, "shakespeare"), clients=2, seed=0)
    assert fd.train.client_ids == ("HAMLET_OPHELIA", "THE_TEMPEST_MIRANDA")
    assert fd.num_classes == 80 and fd.input_shape == (80,)
    assert type(fd.task).__name__ == "Classification"
    x, y = fd.train.client(1)
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == (2, 80)
    np.testing.assert_array_equal(x[0], [LEAF_ALL_LETTERS.find(c) for c in line])
    assert x[0, :3].tolist() == [44, 67, 1]  # 'T' (A is 25), 'o' (a is 53), ' ' by hand
    np.testing.assert_array_equal(y, [LEAF_ALL_LETTERS.find("f"), LEAF_ALL_LETTERS.find("e")])
    assert word_to_indices("\n}") == [0, 79]
    xt, yt = fd.train.client_test(1)
    assert yt.tolist() == [79] and xt.shape == (1, 80)
    assert fd.train.client_test(0)[0].shape == (0, 80)
    bad = tmp_path / "bad"
    write_leaf(bad, "train", "t.json", {"u": {"x": ["\u00e9" * 80], "y": ["a"]}})
    write_leaf(bad, "test", "t.json", {"u": {"x": ["a" * 80], "y": ["a"]}})
    with pytest.raises(DataError, match="ALL_LETTERS"):
        load_federated_data(_cfg(bad, "shakespeare"), clients=1, seed=0)


def _tweet(text):
    return ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "user", text]


def test_sent140_tokenized_like_leafs_line_to_indices(tmp_path):
    from fedsim.data.leaf import split_line
    from fedsim.tasks.binary import Binary

    assert split_line("I can't wait!! see you @ 5pm...") == [
        "I", "can't", "wait", "!", "!", "see", "you", "5pm", ".", ".", "."]
    train = {"zed": {"x": [_tweet("good day, good night"), _tweet("bad day")], "y": [1, 0]},
             "amy": {"x": [_tweet("good " * 30)], "y": [1]}}
    write_leaf(tmp_path, "train", "sent140_train.json", train)
    write_leaf(tmp_path, "test", "sent140_test.json",
               {"zed": {"x": [_tweet("a good, unseen day")], "y": [0]}})
    fd = load_federated_data(_cfg(tmp_path, "sent140", vocab_size=3), clients=2, seed=0)
    # counts: good 33, day 2, ',' 1, night 1, bad 1 -> top 3: good(1), day(2), ','(3); oov 4
    assert fd.train.vocab == ("good", "day", ",")
    assert fd.train.client_ids == ("amy", "zed")
    assert isinstance(fd.task, Binary) and fd.num_classes == 1 and fd.input_shape == (25,)
    x, y = fd.train.client(1)
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == (2, 25)
    np.testing.assert_array_equal(x[0], [1, 2, 3, 1, 4] + [0] * 20)
    np.testing.assert_array_equal(x[1], [4, 2] + [0] * 23)
    np.testing.assert_array_equal(y, [1, 0])
    np.testing.assert_array_equal(fd.train.client(0)[0][0], [1] * 25)  # truncated to 25 words
    xt, yt = fd.train.client_test(1)
    np.testing.assert_array_equal(xt[0, :6], [4, 1, 3, 4, 2, 0])
    assert yt.tolist() == [0] and fd.train.client_test(0)[0].shape == (0, 25)
    short = load_federated_data(_cfg(tmp_path, "sent140", sequence_length=3), clients=2, seed=0)
    assert short.input_shape == (3,) and short.train.client(1)[0][0].tolist() == [1, 2, 3]


def test_leaf_errors(tmp_path):
    with pytest.raises(DataError) as err:
        load_federated_data(_cfg(tmp_path, "femnist"), clients=1, seed=0)
    assert str(tmp_path / "train") in str(err.value)
    assert "nothing is downloaded" in str(err.value)
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "x.json").write_text('{"users": []}')
    with pytest.raises(DataError, match="malformed file"):
        load_federated_data(_cfg(tmp_path, "femnist"), clients=1, seed=0)
    with pytest.raises(ConfigError, match="data.leaf_dataset"):
        DataConfig(name="leaf", path=str(tmp_path))
    with pytest.raises(ConfigError, match="data.leaf_dataset"):
        DataConfig(name="leaf", leaf_dataset="reddit", path=str(tmp_path))
    with pytest.raises(ConfigError, match="data.path"):
        DataConfig(name="leaf", leaf_dataset="femnist")

"""The benchmark-task models (fedsim.models.emnist_cnn, char_lstm, word_lstm,
tag_logreg, resnet_gn) against the TFF 0.87 baselines' Keras models they mirror:
the same layers, configs and parameter counts, the same function (TFF's weights
copied into fedsim's model give TFF's outputs, before its softmax/sigmoid),
seeded initial weights, logits of the right shape, and mask_zero padding."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

tf = pytest.importorskip("tensorflow")

from fedsim.models import (  # noqa: E402
    char_lstm,
    emnist_cnn,
    resnet_gn,
    tag_logreg,
    word_lstm,
)
from fedsim.models.keras import count_parameters  # noqa: E402

# Small sizes for the tests that run the models or build them several times.
SMALL = {
    "emnist_cnn": (emnist_cnn.build, (28, 28, 1), 62, {}),
    "char_lstm": (char_lstm.build, (6,), 11, {"lstm_size": 5}),
    "word_lstm": (word_lstm.build, (6,), 13, {"embedding_size": 4, "lstm_size": 7}),
    "word_lstm_shared": (word_lstm.build, (6,), 13,
                         {"embedding_size": 4, "lstm_size": 7, "shared_embedding": True}),
    "tag_logreg": (tag_logreg.build, (17,), 9, {}),
    "resnet_gn": (resnet_gn.build, (16, 16, 3), 7,
                  {"initial_filters": 4, "groups": 2, "repetitions": (1, 1)}),
}


@pytest.fixture(scope="module")
def tff_models():
    """TFF's model constructors (importing only the baselines' modules)."""
    from tensorflow_federated.python.simulation.baselines.emnist import emnist_models
    from tensorflow_federated.python.simulation.baselines.shakespeare import (
        char_prediction_models,
        char_prediction_tasks,
    )
    from tensorflow_federated.python.simulation.baselines.stackoverflow import (
        tag_prediction_tasks,
        word_prediction_models,
    )
    from tensorflow_federated.python.simulation.models import resnet_models

    return {
        "emnist": emnist_models.create_conv_dropout_model,
        "char": char_prediction_models.create_recurrent_model,
        "char_vocab": char_prediction_tasks.VOCAB_LENGTH,
        "word": word_prediction_models.create_recurrent_model,
        "tag": tag_prediction_tasks._build_logistic_regression_model,
        "resnet18": resnet_models.create_resnet18,
        "resnet": resnet_models.create_resnet,
        "basic": resnet_models.ResidualBlock.BASIC,
    }


def _pairs(tff, full):
    """(fedsim model, TFF model, TFF's final activation) for each family: at the
    task sizes of Reddi et al. (``full``) or at small ones."""
    if full:
        return {
            "emnist_cnn": (emnist_cnn.build((28, 28, 1), 62, 0),
                           tff["emnist"](only_digits=False), "softmax"),
            "char_lstm": (char_lstm.build((80,), tff["char_vocab"], 0),
                          tff["char"](tff["char_vocab"], 80), "linear"),
            "word_lstm": (word_lstm.build((20,), 10004, 0), tff["word"](10004), "linear"),
            "tag_logreg": (tag_logreg.build((10000,), 500, 0), tff["tag"](10000, 500),
                           "sigmoid"),
            "resnet_gn": (resnet_gn.build((24, 24, 3), 100, 0),
                          tff["resnet18"]((24, 24, 3), 100), "softmax"),
        }
    return {
        "emnist_cnn": (emnist_cnn.build((28, 28, 1), 10, 0), tff["emnist"](only_digits=True),
                       "softmax"),
        "char_lstm": (char_lstm.build((6,), 11, 0), tff["char"](11, 6), "linear"),
        "word_lstm": (word_lstm.build((6,), 13, 0, embedding_size=4, lstm_size=7,
                                      num_lstm_layers=2),
                      tff["word"](13, embedding_size=4, lstm_size=7, num_lstm_layers=2),
                      "linear"),
        "word_lstm_shared": (word_lstm.build((6,), 13, 0, embedding_size=4, lstm_size=7,
                                             shared_embedding=True),
                             tff["word"](13, embedding_size=4, lstm_size=7,
                                         shared_embedding=True), "linear"),
        "tag_logreg": (tag_logreg.build((17,), 9, 0), tff["tag"](17, 9), "sigmoid"),
        "resnet_gn": (resnet_gn.build((16, 16, 3), 7, 0, initial_filters=32,
                                      repetitions=(1, 2)),
                      tff["resnet"]((16, 16, 3), 7, residual_block=tff["basic"],
                                    repetitions=[1, 2], initial_filters=32), "softmax"),
    }


@pytest.fixture(scope="module")
def small_pairs(tff_models):
    """The small pairs, built once for the tests that compare them."""
    return _pairs(tff_models, full=False)


def _layers(model):
    return [layer for layer in model.layers if not isinstance(layer, tf.keras.layers.InputLayer)]


def _config(layer):
    """A layer's config without what may differ: names, initializers' seeds,
    Embedding's input_length (TFF's char model fixes it in the Embedding, fedsim
    in the Input)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()
                    if k not in ("name", "seed", "input_length", "batch_input_shape")}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    try:
        return clean(layer.get_config())
    except NotImplementedError:  # TransposableEmbedding: no config, no sizes of its own
        return {}


def test_parameter_counts_at_the_task_sizes_equal_tff(tff_models):
    """Reddi et al.'s sizes: EMNIST-62, Shakespeare (90 characters, T=80),
    StackOverflow words (10,000 + 4 special tokens, T=20) and tags (10,000 words,
    500 tags), CIFAR-100 (24x24 crops)."""
    counts = {}
    for name, (ours, theirs, _) in _pairs(tff_models, full=True).items():
        counts[name] = (count_parameters(ours), theirs.count_params())
        assert ours.count_params() == theirs.count_params(), name
        # all of TFF's parameters are trainable, so fedsim federates all of them
        assert len(ours.trainable_variables) == len(theirs.trainable_variables), name
    assert counts == {
        "emnist_cnn": (1206590, 1206590),
        "char_lstm": (820522, 820522),
        "word_lstm": (4050748, 4050748),
        "tag_logreg": (5000500, 5000500),
        "resnet_gn": (11227812, 11227812),
    }


def test_layers_and_their_configs_equal_tff_but_the_final_activation(small_pairs):
    for name, (ours, theirs, activation) in small_pairs.items():
        mine, tffs = _layers(ours), _layers(theirs)
        assert [type(a).__name__ for a in mine] == [type(b).__name__ for b in tffs], name
        assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights], name
        assert ours.count_params() == theirs.count_params(), name
        for a, b in zip(mine[:-1], tffs[:-1]):
            assert _config(a) == _config(b), (name, a.name)
        last_a, last_b = _config(mine[-1]), _config(tffs[-1])
        if "activation" in last_b:
            assert last_b.pop("activation") == activation
            assert last_a.pop("activation") == "linear", name
        assert last_a == last_b, name
        # the L2 penalties TFF's training adds to the loss are there too (ResNet)
        assert len(ours.losses) == len(theirs.losses), name


def _inputs(model, batch, rng):
    shape = (batch, *model.input_shape[1:])
    if model.input.dtype.is_integer:
        vocab = model.output_shape[-1]
        ids = rng.integers(1, vocab, size=shape)
        ids[:, 2] = 0  # padding in the middle, and at the end
        ids[0, -2:] = 0
        return ids.astype(np.int32)
    return rng.normal(size=shape).astype(np.float32)


def test_tff_weights_in_fedsim_models_give_tff_outputs(small_pairs):
    """Copying TFF's (randomly initialised) weights into fedsim's model gives TFF's
    outputs: the same function, padding masked the same way; fedsim's are the
    logits of TFF's softmax/sigmoid."""
    rng = np.random.default_rng(5)
    for name, (ours, theirs, activation) in small_pairs.items():
        ours.set_weights(theirs.get_weights())
        x = _inputs(ours, 3, rng)
        logits = ours(x, training=False).numpy()
        expected = theirs(x.astype(np.float32) if name.startswith("word") else x,
                          training=False).numpy()
        got = {"softmax": tf.nn.softmax, "sigmoid": tf.sigmoid,
               "linear": tf.identity}[activation](logits).numpy()
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6, err_msg=name)


def _weights(build, shape, classes, kwargs, seed):
    return [v.numpy() for v in build(shape, classes, seed, **kwargs).trainable_variables]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_same_seed_same_weights_other_seed_other_weights(name):
    build, shape, classes, kwargs = SMALL[name]
    a = _weights(build, shape, classes, kwargs, 3)
    b = _weights(build, shape, classes, kwargs, 3)
    c = _weights(build, shape, classes, kwargs, 4)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    random = [i for i, u in enumerate(a) if np.unique(u).size > 2]  # not biases, gammas
    assert random, name
    for i in random:
        assert not np.array_equal(a[i], c[i]), (name, i)
    # each random layer draws its own seed: no two such variables of one shape agree
    for i in random:
        for j in random:
            if i < j and a[i].shape == a[j].shape:
                assert not np.array_equal(a[i], a[j]), (name, i, j)


_DIGEST = """
import hashlib, json, sys
sys.path.insert(0, "tests")
import numpy as np
from test_task_models import SMALL
out = {}
for name, (build, shape, classes, kwargs) in sorted(SMALL.items()):
    h = hashlib.sha256()
    for v in build(shape, classes, 3, **kwargs).trainable_variables:
        h.update(np.ascontiguousarray(v.numpy()).tobytes())
    out[name] = h.hexdigest()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_same_seed_same_weights_in_another_process():
    """No global seed: a fresh interpreter builds the same initial weights (a fresh
    process, hence slow)."""
    mine = {}
    for name, (build, shape, classes, kwargs) in sorted(SMALL.items()):
        h = hashlib.sha256()
        for v in build(shape, classes, 3, **kwargs).trainable_variables:
            h.update(np.ascontiguousarray(v.numpy()).tobytes())
        mine[name] = h.hexdigest()
    tf.random.uniform([3])  # this process's global random state moves; seeds do not
    proc = subprocess.run([sys.executable, "-c", _DIGEST], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == mine


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_are_logits_of_the_task_shape(name):
    build, shape, classes, kwargs = SMALL[name]
    model = build(shape, classes, 0, **kwargs)
    assert count_parameters(model) == model.count_params()
    x = _inputs(model, 2, np.random.default_rng(0))
    out = model(x, training=False).numpy()
    sequence = name.startswith(("char", "word"))
    assert out.shape == ((2, shape[0], classes) if sequence else (2, classes))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # logits, not probabilities: no softmax or sigmoid at the end
    assert (out < 0).any()
    if sequence:  # float32 ids (fedsim's model check feeds float32 zeros) work too
        np.testing.assert_array_equal(model(x.astype(np.float32), training=False).numpy(), out)


@pytest.mark.parametrize("name", ["char_lstm", "word_lstm", "word_lstm_shared"])
def test_padding_is_skipped_as_tff_mask_zero_defines(name):
    """With mask_zero, the LSTMs skip id-0 steps: inserting padding before a
    token leaves the outputs at the real tokens unchanged, so a padded sequence's
    real positions give the unpadded sequence's outputs."""
    build, shape, classes, kwargs = SMALL[name]
    model = build(shape, classes, 1, **kwargs)
    plain = np.array([[3, 5, 2, 7, 1, 4]], np.int32)
    padded = np.array([[3, 0, 5, 0, 0, 2]], np.int32)
    out_plain = model(plain, training=False).numpy()[0]
    out_padded = model(padded, training=False).numpy()[0]
    np.testing.assert_allclose(out_padded[[0, 2, 5]], out_plain[[0, 1, 2]], rtol=1e-5,
                               atol=1e-6)
    # and the first output depends on the token (not a constant)
    assert not np.allclose(out_plain[0], out_plain[1])


def test_char_lstm_without_mask_zero_reads_padding():
    build, shape, classes, kwargs = SMALL["char_lstm"]
    model = build(shape, classes, 1, mask_zero=False, **kwargs)
    a = model(np.array([[3, 5, 2, 7, 1, 4]]), training=False).numpy()[0]
    b = model(np.array([[3, 0, 5, 2, 7, 1]]), training=False).numpy()[0]
    assert not np.allclose(a[1], b[2], atol=1e-6)


def test_dropout_only_in_training():
    model = emnist_cnn.build((28, 28, 1), 10, 0)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(model(x, training=False).numpy(),
                                  model(x, training=False).numpy())
    assert not np.allclose(model(x, training=True).numpy(), model(x, training=False).numpy())


@pytest.mark.parametrize("build, shape, kwargs, match", [
    (emnist_cnn.build, (28, 28), {}, "height, width, channels"),
    (emnist_cnn.build, (4, 4, 1), {}, "at least 6x6"),
    (char_lstm.build, (4, 2), {}, r"\(T,\)"),
    (word_lstm.build, (6,), {"lstm_size": 0}, "lstm_size must be a positive integer"),
    (tag_logreg.build, (3, 3), {}, r"\(vocab,\)"),
    (resnet_gn.build, (16, 16, 3), {"initial_filters": 8, "groups": 3}, "groups=3 must divide"),
])
def test_wrong_shapes_and_sizes_are_refused(build, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(shape, 5, 0, **kwargs)


def test_model_yamls_name_the_builders():
    """``model=<name>`` composes (against fedsim's schema) to model=keras with the
    builder, which imports."""
    from hydra import compose, initialize_config_dir

    from fedsim.cli import register_configs, to_sim_config
    from fedsim.config import import_callable

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        for name in ("emnist_cnn", "char_lstm", "word_lstm", "tag_logreg", "resnet_gn"):
            model = to_sim_config(compose(config_name="config",
                                          overrides=[f"model={name}"])).model
            assert (model.name, model.builder) == ("keras", f"fedsim.models.{name}:build")
            assert import_callable(model.builder, "model.builder") is globals()[name].build

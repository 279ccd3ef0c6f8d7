"""Task kinds: their losses and metrics against Keras' and TFF's own (the
oracles), configured names, and the client-percentile summary by hand."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fedsim.client.evaluation import ClientEval
from fedsim.config import ModelConfig
from fedsim.data.base import ExampleSpec
from fedsim.errors import ConfigError
from fedsim.models.spec import ModelSpec, check_model, model_spec
from fedsim.results.client_metrics import client_rows, summarize_clients
from fedsim.tasks.base import TASKS, KerasLoss, metric_parts, resolve_metric, resolve_task
from fedsim.tasks.binary import Binary
from fedsim.tasks.classification import Classification
from fedsim.tasks.multilabel import MultiLabel
from fedsim.tasks.next_token import NextTokenPrediction
from fedsim.tasks.regression import Regression


def ratio(metric, batches):
    """A per-example metric's reported value over several batches: the ratio of sums."""
    num = den = 0.0
    for y, logits in batches:
        n, d = metric_parts(metric(tf.constant(y), tf.constant(logits)))
        num, den = num + float(tf.reduce_sum(n)), den + float(tf.reduce_sum(d))
    return num / den


def keras_value(metric, batches, transform=lambda z: z):
    for y, logits in batches:
        metric.update_state(y, transform(tf.constant(logits)))
    return float(metric.result())


def test_next_token_accuracies_and_loss_match_tffs_baseline_metrics():
    from tensorflow_federated.python.simulation.baselines.keras_metrics import (
        MaskedCategoricalAccuracy,
    )

    rng = np.random.default_rng(0)
    vocab, pad, oov, eos = 9, 0, (7,), 8
    batches = []
    for b in (5, 3):
        y = rng.integers(0, vocab, size=(b, 6)).astype(np.int32)
        y[:, -2:] = pad  # padded tails
        batches.append((y, rng.normal(size=(b, 6, vocab)).astype(np.float32)))
    task = NextTokenPrediction(pad=pad, oov=oov, eos=eos)
    ours = task.default_metrics()
    assert set(ours) == {"accuracy", "accuracy_without_out_of_vocab",
                         "accuracy_without_out_of_vocab_or_end_of_sentence"}
    for name, masked in (("accuracy", [pad]), ("accuracy_without_out_of_vocab", [pad, 7]),
                         ("accuracy_without_out_of_vocab_or_end_of_sentence", [pad, 8, 7])):
        want = keras_value(MaskedCategoricalAccuracy(masked_tokens=masked), batches)
        assert ratio(ours[name], batches) == pytest.approx(want, rel=1e-6)
    # The loss: TFF trains with Keras' mean over every position of every example.
    y, logits = batches[0]
    want = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    num, den = task.default_loss()(tf.constant(y), tf.constant(logits))
    assert num.shape == den.shape == (5,) and float(tf.reduce_sum(den)) == 5 * 6  # no mask
    assert float(tf.reduce_sum(num) / tf.reduce_sum(den)) == pytest.approx(float(want), rel=1e-6)
    assert ratio(task.named_metric("num_tokens"), batches[:1]) == pytest.approx(
        np.count_nonzero(y != pad) / len(y))  # unpadded tokens per example


def test_next_token_loss_is_keras_loss_on_the_masked_output_of_a_padded_model():
    """With mask_zero (fedsim's char LSTM, as TFF's), Keras' loss class averages
    over the unpadded input positions only; the task's (sum, count) gives the same."""
    from fedsim.models.char_lstm import build

    model = build((6,), 9, seed=0)
    x = np.array([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]], np.int32)
    y = np.array([[4, 5, 8, 0, 0, 0], [2, 3, 4, 5, 6, 8]], np.int32)
    logits = model(x)
    want = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    num, den = NextTokenPrediction().default_loss()(tf.constant(y), logits)
    np.testing.assert_array_equal(den, [3, 6])
    assert float(tf.reduce_sum(num) / tf.reduce_sum(den)) == pytest.approx(float(want), rel=1e-6)


def test_multilabel_precision_recall_at_5_and_loss_match_keras():
    rng = np.random.default_rng(1)
    batches = []
    for b in (6, 4):
        y = (rng.random((b, 12)) < 0.3).astype(np.float32)
        y[0] = 0.0  # an example without tags counts for nothing
        batches.append((y, rng.normal(size=(b, 12)).astype(np.float32)))
    task = MultiLabel()
    assert task.primary_metric == "recall_at_5"
    m = task.default_metrics()
    assert ratio(m["precision"], batches) == pytest.approx(
        keras_value(tf.keras.metrics.Precision(), batches, tf.sigmoid), rel=1e-6)
    assert ratio(m["recall_at_5"], batches) == pytest.approx(
        keras_value(tf.keras.metrics.Recall(top_k=5), batches, tf.sigmoid), rel=1e-6)
    y, logits = batches[0]
    got = task.default_loss()(tf.constant(y), tf.constant(logits))
    want = tf.keras.losses.BinaryCrossentropy(from_logits=True)(y, logits)
    assert float(tf.reduce_mean(got)) == pytest.approx(float(want), rel=1e-5)


def test_binary_and_regression_match_keras():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=(16,)).astype(np.float32)
    logits = rng.normal(size=(16, 1)).astype(np.float32)
    task = Binary()
    assert ratio(task.default_metrics()["accuracy"], [(y, logits)]) == pytest.approx(
        keras_value(tf.keras.metrics.BinaryAccuracy(), [(y[:, None], logits)], tf.sigmoid))
    got = float(tf.reduce_mean(task.default_loss()(tf.constant(y), tf.constant(logits))))
    assert got == pytest.approx(float(tf.keras.losses.BinaryCrossentropy(from_logits=True)(
        y[:, None], logits)), rel=1e-6)
    target = rng.normal(size=(16, 3)).astype(np.float32)
    out = rng.normal(size=(16, 3)).astype(np.float32)
    reg = Regression()
    assert not reg.higher_is_better and reg.primary_metric == "mse"
    assert ratio(reg.default_metrics()["mse"], [(target, out)]) == pytest.approx(
        keras_value(tf.keras.metrics.MeanSquaredError(), [(target, out)]), rel=1e-6)
    assert ratio(reg.default_metrics()["mae"], [(target, out)]) == pytest.approx(
        keras_value(tf.keras.metrics.MeanAbsoluteError(), [(target, out)]), rel=1e-6)


def test_tasks_by_name_and_equality_and_layout_checks():
    for name in TASKS:
        assert resolve_task(name).name == name
    assert NextTokenPrediction(0, (5,), 6) == NextTokenPrediction(0, (5,), 6)
    assert NextTokenPrediction(0, (5,), 6) != NextTokenPrediction(0, (5,), 7)
    with pytest.raises(ConfigError, match="^data.task=nope: allowed is one of classification"):
        resolve_task("nope")
    seq = ExampleSpec((8,), "int32", (8,), "int32")
    assert NextTokenPrediction().check_example(seq) is None
    assert "one int32 label" in Classification().check_example(seq)
    assert NextTokenPrediction().output_shape(seq, 30) == (8, 30)
    assert ExampleSpec.of(np.zeros((3, 8), np.int64), np.zeros((3, 8), np.int32)) == seq
    assert ExampleSpec.of(np.zeros((3, 2), np.float64), np.zeros(3, np.int16)).is_default


def test_configured_loss_and_metric_names():
    spec = model_spec(ModelConfig(name="logreg", loss="sparse_categorical_crossentropy",
                                  metrics=["accuracy", "sparse_top_k_categorical_accuracy",
                                           "tests.test_tasks:always_one"]))
    assert isinstance(spec.loss, KerasLoss) and spec.own_loss
    assert list(spec.metrics) == ["accuracy", "sparse_top_k_categorical_accuracy",
                                  "always_one"]
    y = tf.constant([1, 2], tf.int32)
    logits = tf.constant([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    want = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none")(y, logits)
    np.testing.assert_allclose(spec.loss(y, logits), want, rtol=1e-6)
    np.testing.assert_allclose(spec.metrics["sparse_top_k_categorical_accuracy"](y, logits),
                               [1.0, 1.0])
    for name, fragment in (("AUC", "a metric of task classification (accuracy)"),
                           ("no_such_metric", "Keras metric function")):
        with pytest.raises(ConfigError) as err:
            resolve_metric(name, Classification())
        assert str(err.value).startswith(f"model.metrics={name}: allowed is")
        assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^model.loss=nonsense: allowed is a Keras loss"):
        model_spec(ModelConfig(name="logreg", loss="nonsense"))
    with pytest.raises(ConfigError, match="^model.metrics="):
        ModelConfig(metrics=["accuracy", "accuracy"])


def always_one(y_true, logits):
    return tf.ones_like(tf.reduce_sum(logits, axis=-1))


def test_bind_gives_the_tasks_defaults_and_keeps_a_specs_own():
    def build(shape, c, seed):
        return tf.keras.Sequential([tf.keras.Input(shape), tf.keras.layers.Dense(c)])

    tags = ExampleSpec((20,), "float32", (7,), "float32")
    plain = ModelSpec(build).bind("multilabel", tags)
    assert plain.kind == MultiLabel() and set(plain.metrics) == {"precision", "recall_at_5"}
    assert plain.loss is MultiLabel().default_loss()
    own = ModelSpec(build, loss=always_one).bind(MultiLabel(), tags)
    assert own.loss is always_one and set(own.metrics) == {"precision", "recall_at_5"}
    assert check_model(plain, (20,), 7, 0) == 20 * 7 + 7
    seq = ModelSpec(build).bind(NextTokenPrediction(), ExampleSpec((5,), "float32", (5,), "int32"))
    with pytest.raises(ConfigError) as err:
        check_model(seq, (5,), 11, 0)
    assert "output for task next_token is [batch, 5, 11] logits" in str(err.value)


def _eval(cid, n, loss, acc_num, acc_den):
    return ClientEval(cid, n, loss, {"accuracy": (acc_num, acc_den)})


def test_client_summary_by_hand():
    evals = [_eval(0, 4, 2.0, 1.0, 4.0), _eval(1, 2, 1.0, 2.0, 2.0), _eval(2, 0, 0.0, 0.0, 0.0),
             _eval(3, 10, 5.0, 5.0, 10.0), _eval(4, 4, 4.0, 3.0, 4.0)]
    row = summarize_clients(evals, "fed")
    # Client 2 has no test examples: skipped. Values: acc 0.25, 1.0, 0.5, 0.75.
    assert row["fed_clients"] == 4 and row["fed_examples"] == 20
    assert row["fed_accuracy"] == pytest.approx(11 / 20)
    assert row["fed_accuracy_mean"] == pytest.approx((0.25 + 1.0 + 0.5 + 0.75) / 4)
    # Linear interpolation on the sorted values [0.25, 0.5, 0.75, 1.0] at rank q/100 * 3.
    ranked = [0.25, 0.5, 0.75, 1.0]
    for q in (10, 50, 90):
        pos = q / 100 * 3
        lo = int(pos)
        want = ranked[lo] + (pos - lo) * (ranked[min(lo + 1, 3)] - ranked[lo])
        assert row[f"fed_accuracy_p{q}"] == pytest.approx(want)
    assert row["fed_loss"] == pytest.approx(12.0 / 20)
    assert row["fed_loss_p50"] == pytest.approx(np.median([0.5, 0.5, 0.5, 1.0]))
    per = client_rows(3, evals, "fed")
    assert [r["client"] for r in per] == [0, 1, 3, 4] and per[0]["accuracy"] == 0.25
    assert summarize_clients([], "pers") == {"pers_clients": 0, "pers_examples": 0}

"""Next-token prediction over sequences (TFF's Shakespeare character and
StackOverflow word prediction baselines).

Inputs and labels are int32 token sequences of one length ``T`` (labels are
the inputs shifted by one); the model outputs logits ``[T, vocab]``.

The loss is Keras' ``SparseCategoricalCrossentropy(from_logits=True)`` on the
output of a model whose embedding masks padding: the mean over the positions
the model's mask keeps (per example a pair ``(sum of token losses, tokens
kept)``; the trainers divide the batch's sums). That is what TFF's baseline
tasks ask for and what Keras computes eagerly; inside a TFF 0.87 computation
the mask does not reach the loss, so TFF's runs average over every position,
padding included. ``model.loss=sparse_categorical_crossentropy`` (Keras'
function form, which ignores masks) reproduces TFF's runs exactly.
Accuracies count tokens, as TFF's
``MaskedCategoricalAccuracy`` does: per example ``(correct unmasked tokens,
unmasked tokens)``, so the reported value is correct / counted over the whole
split. ``accuracy`` masks padding; with out-of-vocabulary tokens given,
``accuracy_without_out_of_vocab`` masks them too, and with an end-of-sentence
token ``accuracy_without_out_of_vocab_or_end_of_sentence`` masks that as well
(the names of TFF's StackOverflow task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from fedsim.tasks.base import Metric, Task


def sequence_crossentropy(y_true: Any, logits: Any) -> Any:
    """Per example ``(sum of its token cross-entropies, tokens counted)``: the
    positions the model's Keras mask keeps (``logits._keras_mask``, set by an
    ``Embedding(mask_zero=True)``), or every position for a model without one.
    The ratio of the sums over a batch is Keras' ``SparseCategoricalCrossentropy
    (from_logits=True)`` on the masked model output (see the module docstring
    for TFF's runs, which lose the mask)."""
    import tensorflow as tf

    per_token = tf.keras.losses.sparse_categorical_crossentropy(
        tf.cast(y_true, tf.int32), logits, from_logits=True)
    mask = getattr(logits, "_keras_mask", None)
    weights = tf.ones_like(per_token) if mask is None else tf.cast(mask, per_token.dtype)
    return tf.reduce_sum(per_token * weights, axis=-1), tf.reduce_sum(weights, axis=-1)


def _kept(y_true: Any, masked: tuple[int, ...]) -> tuple[Any, Any]:
    """(int32 labels, float32 1.0 where the label is none of ``masked``)."""
    import tensorflow as tf

    y = tf.cast(y_true, tf.int32)
    keep = tf.ones_like(y, tf.bool)
    for token in masked:
        keep = tf.logical_and(keep, tf.not_equal(y, token))
    return y, tf.cast(keep, tf.float32)


@dataclass(frozen=True)
class MaskedTokenAccuracy:
    """Per example ``(correct tokens, counted tokens)`` over the positions whose
    label is not one of ``masked`` (TFF's ``MaskedCategoricalAccuracy``)."""

    masked: tuple[int, ...]

    def __call__(self, y_true: Any, logits: Any) -> Any:
        import tensorflow as tf

        y, keep = _kept(y_true, self.masked)
        hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y), tf.float32)
        return tf.reduce_sum(hit * keep, axis=-1), tf.reduce_sum(keep, axis=-1)


@dataclass(frozen=True)
class TokenCount:
    """Per example: its unmasked tokens (reported summed, as TFF's
    ``NumTokensCounter``; the ratio form has denominator 1 per example, so
    the reported mean is tokens per example)."""

    masked: tuple[int, ...]

    def __call__(self, y_true: Any, logits: Any) -> Any:
        import tensorflow as tf

        return tf.reduce_sum(_kept(y_true, self.masked)[1], axis=-1)


class NextTokenPrediction(Task):
    """pad: the padding token id (masked from every accuracy). oov: the
    out-of-vocabulary token ids. eos: the end-of-sentence id (None: none).
    ``num_classes`` is the whole vocabulary, special tokens included."""

    name = "next_token"
    primary_metric = "accuracy"

    def __init__(self, pad: int = 0, oov: Sequence[int] = (), eos: Optional[int] = None) -> None:
        self.pad = int(pad)
        self.oov = tuple(int(t) for t in oov)
        self.eos = None if eos is None else int(eos)

    def output_shape(self, example: Any, num_classes: int) -> tuple[int, ...]:
        return (*tuple(example.label_shape), int(num_classes))

    def default_loss(self) -> Metric:
        return sequence_crossentropy

    def default_metrics(self) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {"accuracy": MaskedTokenAccuracy((self.pad,))}
        if self.oov:
            metrics["accuracy_without_out_of_vocab"] = MaskedTokenAccuracy(
                (self.pad, *self.oov))
        if self.eos is not None:
            metrics["accuracy_without_out_of_vocab_or_end_of_sentence"] = MaskedTokenAccuracy(
                (self.pad, self.eos, *self.oov))
        return metrics

    def named_metric(self, name: str) -> Metric | None:
        if name == "num_tokens":
            return TokenCount((self.pad,))
        return super().named_metric(name)

    def check_example(self, example: Any) -> str | None:
        if (len(example.label_shape) != 1 or example.label_dtype != "int32"
                or example.input_dtype != "int32"):
            return (f"int32 token sequences as inputs and labels (inputs are "
                    f"{example.input_dtype} {list(example.input_shape)}, labels "
                    f"{example.label_dtype} {list(example.label_shape)})")
        return None

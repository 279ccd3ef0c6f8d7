"""Binary classification: a 0/1 label per example, ONE logit out; the sigmoid
cross-entropy, and the accuracy of ``logit > 0`` (probability > 0.5)."""

from __future__ import annotations

from typing import Any

from fedsim.tasks.base import Metric, Task


def binary_crossentropy(y_true: Any, logits: Any) -> Any:
    """Per example: the sigmoid cross-entropy of the label on the single logit."""
    import tensorflow as tf

    return tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(tf.reshape(y_true, [-1]), logits.dtype), logits=tf.reshape(logits, [-1]))


def binary_accuracy(y_true: Any, logits: Any) -> Any:
    """1.0 where ``(logit > 0) == (label > 0.5)``, per example."""
    import tensorflow as tf

    predicted = tf.reshape(logits, [-1]) > 0.0
    truth = tf.cast(tf.reshape(y_true, [-1]), tf.float32) > 0.5
    return tf.cast(tf.equal(predicted, truth), tf.float32)


class Binary(Task):
    """Labels: one 0/1 per example (int32 or float32). Output: ``[1]`` logit."""

    name = "binary"
    primary_metric = "accuracy"

    def output_shape(self, example: Any, num_classes: int) -> tuple[int, ...]:
        return (1,)

    def default_loss(self) -> Metric:
        return binary_crossentropy

    def default_metrics(self) -> dict[str, Metric]:
        return {"accuracy": binary_accuracy}

    def check_example(self, example: Any) -> str | None:
        if tuple(example.label_shape) != ():
            return f"one 0/1 label per example (labels have shape {list(example.label_shape)})"
        return None

"""Single-label classification: an integer label per example, logits over
``num_classes``; sparse categorical cross-entropy and accuracy (fedsim's
original task, bit for bit)."""

from __future__ import annotations

from typing import Any

from fedsim.tasks.base import Metric, Task


def sparse_categorical_crossentropy(y_true: Any, logits: Any) -> Any:
    """Per-example cross-entropy of integer labels on logits, ``[batch]``
    (Keras' ``SparseCategoricalCrossentropy(from_logits=True)``, reduction NONE:
    its sum is bit for bit the SUM-reduced loss fedsim used before specs)."""
    import tensorflow as tf

    return tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE)(y_true, logits)


def accuracy(y_true: Any, logits: Any) -> Any:
    """1.0 where ``argmax(logits) == y_true``, else 0.0, per example (float32)."""
    import tensorflow as tf

    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(predicted, tf.cast(y_true, tf.int32)), tf.float32)


class Classification(Task):
    """Labels: int32, one per example, in ``[0, num_classes)``. Output: logits
    ``[num_classes]``. Inputs of any shape and dtype (images, features, token
    sequences, e.g. LEAF Shakespeare's next character)."""

    name = "classification"
    primary_metric = "accuracy"

    def output_shape(self, example: Any, num_classes: int) -> tuple[int, ...]:
        return (int(num_classes),)

    def default_loss(self) -> Metric:
        return sparse_categorical_crossentropy

    def default_metrics(self) -> dict[str, Metric]:
        return {"accuracy": accuracy}

    def check_example(self, example: Any) -> str | None:
        if tuple(example.label_shape) != () or example.label_dtype != "int32":
            return (f"one int32 label per example (labels have shape "
                    f"{list(example.label_shape)}, dtype {example.label_dtype})")
        return None

"""Regression: float32 targets of any shape; the model outputs that shape (or
``[1]`` for a scalar target). Squared error trains; ``mse`` (the primary
metric, lower is better) and ``mae`` evaluate, each averaged over a target's
components."""

from __future__ import annotations

from typing import Any

from fedsim.tasks.base import Metric, Task, per_example


def squared_error(y_true: Any, outputs: Any) -> Any:
    """Per example: the mean squared error over the target's components."""
    import tensorflow as tf

    y = tf.reshape(tf.cast(y_true, outputs.dtype), tf.shape(outputs))
    return per_example(tf.square(outputs - y))


def absolute_error(y_true: Any, outputs: Any) -> Any:
    """Per example: the mean absolute error over the target's components."""
    import tensorflow as tf

    y = tf.reshape(tf.cast(y_true, outputs.dtype), tf.shape(outputs))
    return per_example(tf.abs(outputs - y))


class Regression(Task):
    name = "regression"
    primary_metric = "mse"
    higher_is_better = False

    def output_shape(self, example: Any, num_classes: int) -> tuple[int, ...]:
        return tuple(example.label_shape) or (1,)

    def default_loss(self) -> Metric:
        return squared_error

    def default_metrics(self) -> dict[str, Metric]:
        return {"mse": squared_error, "mae": absolute_error}

    def check_example(self, example: Any) -> str | None:
        if example.label_dtype != "float32":
            return f"float32 targets (labels are {example.label_dtype})"
        return None

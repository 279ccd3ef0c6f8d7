"""Multi-label prediction (TFF's StackOverflow tag prediction baseline).

Labels are multi-hot float32 vectors over ``K`` tags; the model outputs ``K``
logits. The loss is per example the mean over tags of the sigmoid
cross-entropy (Keras' ``BinaryCrossentropy`` on probabilities, as TFF's task,
equals it on logits; TFF sums it over the batch where fedsim's trainers take
the batch mean, so TFF's client learning rates are fedsim's divided by the
batch size). Metrics count as Keras' stateful ones do, per example
``(numerator, denominator)``:

* ``precision``: predicted tags (probability > 0.5) that are true, over
  predicted tags (``tf.keras.metrics.Precision()``);
* ``recall_at_5``: true tags among the 5 highest logits, over true tags
  (``tf.keras.metrics.Recall(top_k=5)``); ``top_k`` sets the 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsim.tasks.base import Metric, Task


def sigmoid_crossentropy(y_true: Any, logits: Any) -> Any:
    """Per example: the mean over labels of the sigmoid cross-entropy, ``[batch]``."""
    import tensorflow as tf

    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(y_true, logits.dtype), logits=logits), axis=-1)


def precision(y_true: Any, logits: Any) -> Any:
    """Per example ``(true predicted tags, predicted tags)``, threshold 0.5."""
    import tensorflow as tf

    predicted = tf.cast(logits > 0.0, tf.float32)
    truth = tf.cast(y_true, tf.float32)
    return tf.reduce_sum(predicted * truth, axis=-1), tf.reduce_sum(predicted, axis=-1)


@dataclass(frozen=True)
class RecallAtK:
    """Per example ``(true tags among the k highest logits, true tags)``."""

    k: int = 5

    def __call__(self, y_true: Any, logits: Any) -> Any:
        import tensorflow as tf

        k = tf.minimum(self.k, tf.shape(logits)[-1])
        top = tf.math.top_k(logits, k=k).indices
        truth = tf.cast(y_true, tf.float32)
        hits = tf.reduce_sum(tf.gather(truth, top, batch_dims=1), axis=-1)
        return hits, tf.reduce_sum(truth, axis=-1)


class MultiLabel(Task):
    """top_k: the k of ``recall_at_<k>`` (5, as TFF's task)."""

    name = "multilabel"

    def __init__(self, top_k: int = 5) -> None:
        self.top_k = int(top_k)
        self.primary_metric = f"recall_at_{self.top_k}"

    def output_shape(self, example: Any, num_classes: int) -> tuple[int, ...]:
        return tuple(example.label_shape)

    def default_loss(self) -> Metric:
        return sigmoid_crossentropy

    def default_metrics(self) -> dict[str, Metric]:
        return {"precision": precision, self.primary_metric: RecallAtK(self.top_k)}

    def check_example(self, example: Any) -> str | None:
        if len(example.label_shape) != 1:
            return (f"multi-hot label vectors, shape [tags] (labels have shape "
                    f"{list(example.label_shape)})")
        return None

"""The logistic regression of Reddi et al. (ICLR 2021) for StackOverflow tag
prediction: TFF 0.87's
``tff.simulation.baselines.stackoverflow.tag_prediction_tasks._build_logistic_regression_model``.

One Dense layer from the bag-of-words vector (float32, ``[vocab]``) to one
output per tag; kernel Glorot-uniform, bias zero (for TFF's default 10,000
words and 500 tags, 5,000,500 parameters). Deliberate differences:

* it outputs LOGITS: TFF's layer has ``activation='sigmoid'`` and its loss is
  ``BinaryCrossentropy(from_logits=False)``; fedsim's multi-label loss
  (:func:`fedsim.tasks.multilabel.sigmoid_crossentropy`) takes logits, and the
  sigmoid of these logits is TFF's output;
* the kernel initializer is seeded from ``seed`` (TFF's is unseeded).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from fedsim.models._seeded import Seeds, check_shape


def build(input_shape: Sequence[int], num_classes: int, seed: int) -> tf.keras.Model:
    """Logistic regression from ``input_shape = (vocab,)`` bag-of-words vectors to
    ``num_classes`` (the number of tags) logits."""
    shape = check_shape(input_shape, 1, "(vocab,) (a bag-of-words vector)", "tag_logreg")
    seeds = Seeds(seed)
    inputs = tf.keras.Input(shape=shape)
    logits = tf.keras.layers.Dense(int(num_classes),
                                   kernel_initializer=seeds.glorot_uniform())(inputs)
    return tf.keras.Model(inputs, logits, name="tag_logreg")

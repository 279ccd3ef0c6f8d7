"""The CNN with dropout of Reddi et al. (ICLR 2021) for EMNIST character
recognition: TFF 0.87's
``tff.simulation.baselines.emnist.emnist_models.create_conv_dropout_model``.

Layers, exactly as TFF's (for 28x28x1 inputs and 62 classes, 1,206,590
parameters; 1,199,882 for the 10 digits)::

    Conv2D(32, 3x3, valid, relu) -> Conv2D(64, 3x3, valid, relu)
    -> MaxPool(2x2) -> Dropout(0.25) -> Flatten
    -> Dense(128, relu) -> Dropout(0.5) -> Dense(num_classes)

kernels Glorot-uniform, biases zero. Deliberate differences:

* the last Dense outputs LOGITS: TFF's ends in ``softmax`` (fedsim's losses
  take logits; the softmax of these logits is TFF's output);
* ``num_classes`` is the output width (TFF's ``only_digits`` picks 10 or 62)
  and ``input_shape`` the image shape (TFF fixes (28, 28, 1));
* every initializer, and both dropout layers, are seeded from ``seed``
  (:class:`fedsim.models._seeded.Seeds`); TFF seeds the initializers from an
  optional ``debug_seed`` and leaves dropout unseeded.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from fedsim.models._seeded import Seeds, check_shape


def build(input_shape: Sequence[int], num_classes: int, seed: int, *,
          conv_dropout: float = 0.25, dense_dropout: float = 0.5) -> tf.keras.Model:
    """The EMNIST CNN for images of ``input_shape`` (height, width, channels;
    at least 6x6), ``num_classes`` logits out. ``conv_dropout``/``dense_dropout``:
    the rates of the two Dropout layers (TFF's 0.25 and 0.5)."""
    shape = check_shape(input_shape, 3, "(height, width, channels)", "emnist_cnn")
    if min(shape[0], shape[1]) < 6:
        raise ValueError(f"emnist_cnn needs images of at least 6x6 (got {list(shape)})")
    seeds = Seeds(seed)
    inputs = tf.keras.Input(shape=shape)
    x = tf.keras.layers.Conv2D(32, kernel_size=(3, 3), activation="relu",
                               kernel_initializer=seeds.glorot_uniform())(inputs)
    x = tf.keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu",
                               kernel_initializer=seeds.glorot_uniform())(x)
    x = tf.keras.layers.MaxPool2D(pool_size=(2, 2))(x)
    x = tf.keras.layers.Dropout(conv_dropout, seed=seeds.next())(x)
    x = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Dense(128, activation="relu",
                              kernel_initializer=seeds.glorot_uniform())(x)
    x = tf.keras.layers.Dropout(dense_dropout, seed=seeds.next())(x)
    logits = tf.keras.layers.Dense(int(num_classes), kernel_initializer=seeds.glorot_uniform())(x)
    return tf.keras.Model(inputs, logits, name="emnist_cnn")

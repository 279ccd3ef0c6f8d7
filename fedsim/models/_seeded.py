"""Seeded Keras initializers for the task models (:mod:`fedsim.models.emnist_cnn`
and its siblings): every initializer, and every other random layer, draws its
own seed from ONE model seed, so that the same ``seed`` builds the same initial
weights in any process without touching TensorFlow's global seed.

The i-th seed is a word of ``np.random.SeedSequence([seed, 0xC0DE, i])`` (the
salt of :func:`fedsim.models.keras.build_model`), masked to 31 bits. Keras
2.14's seeded initializers are stateless, so a seed fixes the values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf


class Seeds:
    """The seeds of one model's random layers, in the order they are asked for."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.count = 0

    def next(self) -> int:
        """The next layer's seed."""
        state = np.random.SeedSequence([self.seed, 0xC0DE, self.count]).generate_state(1)
        self.count += 1
        return int(state[0]) & 0x7FFFFFFF

    def glorot_uniform(self) -> Any:
        """Keras' default kernel initializer (Dense, Conv2D, LSTM kernel), seeded."""
        return tf.keras.initializers.GlorotUniform(seed=self.next())

    def he_normal(self) -> Any:
        """``'he_normal'``, seeded."""
        return tf.keras.initializers.HeNormal(seed=self.next())

    def orthogonal(self) -> Any:
        """Keras' default recurrent initializer (LSTM), seeded."""
        return tf.keras.initializers.Orthogonal(seed=self.next())

    def embedding_uniform(self) -> Any:
        """Keras' default Embedding initializer (``'uniform'``: U(-0.05, 0.05)), seeded."""
        return tf.keras.initializers.RandomUniform(minval=-0.05, maxval=0.05, seed=self.next())

    def random_normal(self, stddev: float) -> Any:
        """``RandomNormal(mean=0, stddev)``, seeded."""
        return tf.keras.initializers.RandomNormal(stddev=stddev, seed=self.next())


def check_shape(input_shape: Any, rank: int, what: str, model: str) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints of length ``rank``, else ValueError."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != rank or any(d < 1 for d in shape):
        raise ValueError(f"{model} needs inputs of shape {what} (got {list(shape)})")
    return shape


def check_positive(**values: int) -> None:
    """ValueError naming the first of ``values`` that is not an integer >= 1."""
    for name, value in values.items():
        if int(value) != value or int(value) < 1:
            raise ValueError(f"{name} must be a positive integer (got {value!r})")

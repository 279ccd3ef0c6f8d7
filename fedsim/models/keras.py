"""Keras models that clients train, and the flat-vector view of their weights.

Every model outputs logits over ``num_classes``; the loss is sparse categorical
cross-entropy on logits. Initialisation is seeded per layer (no global seed), so
the same ``seed`` gives the same initial global model in any process.

Weights travel between actors as ONE flat float32 vector (all trainable variables
concatenated in ``model.trainable_variables`` order): one object-store put per
round, and clipping norms are the global L2 norm over all weights, as in TFF.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from fedsim.config import ModelConfig
from fedsim.errors import ConfigError


def build_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int,
                seed: int) -> tf.keras.Model:
    """Build ``cfg.name`` for inputs of ``input_shape`` (no batch axis).

    logreg: Flatten -> Dense(num_classes).
    mlp: Flatten -> Dense(h, relu) for h in cfg.hidden -> Dense(num_classes).
    cnn: [Conv2D(f, 3x3, same, relu) -> MaxPool(2x2) while the image is >= 2x2]
         for f in cfg.filters -> Flatten -> Dense(128, relu) -> Dense(num_classes).
    """
    seeds = iter(np.random.SeedSequence([seed, 0xC0DE]).generate_state(64))

    def kinit() -> tf.keras.initializers.Initializer:
        return tf.keras.initializers.GlorotUniform(seed=int(next(seeds)) & 0x7FFFFFFF)

    layers: list[tf.keras.layers.Layer] = [tf.keras.Input(shape=tuple(input_shape))]
    if cfg.name == "logreg":
        layers.append(tf.keras.layers.Flatten())
    elif cfg.name == "mlp":
        layers.append(tf.keras.layers.Flatten())
        for h in cfg.hidden:
            layers.append(tf.keras.layers.Dense(int(h), activation="relu",
                                                kernel_initializer=kinit()))
    elif cfg.name == "cnn":
        if len(input_shape) != 3:
            raise ConfigError("model", "logreg or mlp for non-image data of shape "
                              f"{tuple(input_shape)} (cnn needs height x width x channels)",
                              "cnn")
        size = min(input_shape[0], input_shape[1])
        for f in cfg.filters:
            layers.append(tf.keras.layers.Conv2D(int(f), 3, padding="same", activation="relu",
                                                 kernel_initializer=kinit()))
            if size >= 2:
                layers.append(tf.keras.layers.MaxPool2D(2))
                size //= 2
        layers.append(tf.keras.layers.Flatten())
        layers.append(tf.keras.layers.Dense(128, activation="relu", kernel_initializer=kinit()))
    else:  # validated by ModelConfig; kept for library callers that bypass it
        raise ConfigError("model.name", "one of logreg, mlp, cnn", cfg.name)
    layers.append(tf.keras.layers.Dense(num_classes, kernel_initializer=kinit()))
    return tf.keras.Sequential(layers, name=cfg.name)


class FlatWeights:
    """Reads and writes a model's trainable variables as one flat float32 vector."""

    def __init__(self, variables: Sequence[tf.Variable]) -> None:
        self.variables = list(variables)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = int(sum(self.sizes))

    def get(self) -> tf.Tensor:
        """The weights as a flat float32 tensor (graph-compatible)."""
        return tf.concat([tf.reshape(v, [-1]) for v in self.variables], axis=0)

    def assign(self, flat: tf.Tensor) -> None:
        """Assign a flat vector to the variables (graph-compatible)."""
        parts = tf.split(flat, self.sizes)
        for v, p, s in zip(self.variables, parts, self.shapes):
            v.assign(tf.reshape(p, s))


def count_parameters(model: tf.keras.Model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))

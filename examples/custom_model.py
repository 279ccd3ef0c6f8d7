"""Your own Keras model in a federated simulation, without touching fedsim.

A builder is any function ``(input_shape, num_classes, seed) -> tf.keras.Model``
whose model outputs logits. Here it is a small functional CNN with a residual
connection (something fedsim's built-in ``logreg``/``mlp``/``cnn`` do not have).
Pass it to :func:`fedsim.simulation.run_simulation` from Python::

    uv run python examples/custom_model.py

or name it on the command line (from the repository root, so that the driver
and the Ray workers can import ``examples``)::

    uv run python scripts/simulate.py model=keras model.builder=examples.custom_model:build

A bare builder trains on sparse categorical cross-entropy and is evaluated
with accuracy; :data:`MODEL` wraps the same builder in a
:class:`fedsim.models.spec.ModelSpec` that adds a top-2 accuracy metric, which
the server reports as ``eval_top2_accuracy`` (``model.builder=
examples.custom_model:MODEL`` selects it on the command line).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf

from fedsim.config import RayConfig, SimConfig
from fedsim.models.spec import ModelSpec, accuracy
from fedsim.simulation import SimulationResult, run_simulation


def build(input_shape: Sequence[int], num_classes: int, seed: int) -> tf.keras.Model:
    """Conv(8) -> residual block [Conv(8) -> Conv(8)] + skip -> max pool -> Dense(32)
    -> Dense(num_classes) logits, for image inputs ``(H, W, C)``. Every
    initializer is seeded from ``seed``, so the initial global model is the same
    in every run with the same seed."""
    init = iter(tf.keras.initializers.GlorotUniform(seed=seed * 100 + i) for i in range(10))
    L = tf.keras.layers
    inputs = tf.keras.Input(shape=tuple(input_shape))
    h = L.Conv2D(8, 3, padding="same", activation="relu", kernel_initializer=next(init))(inputs)
    r = L.Conv2D(8, 3, padding="same", activation="relu", kernel_initializer=next(init))(h)
    r = L.Conv2D(8, 3, padding="same", kernel_initializer=next(init))(r)
    h = L.ReLU()(L.Add()([h, r]))                      # the skip connection
    h = L.Flatten()(L.MaxPool2D(2)(h))
    h = L.Dense(32, activation="relu", kernel_initializer=next(init))(h)
    logits = L.Dense(num_classes, kernel_initializer=next(init))(h)
    return tf.keras.Model(inputs, logits, name="residual_cnn")


def top2_accuracy(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """1.0 where the label is among the two largest logits, per example."""
    return tf.cast(tf.math.in_top_k(tf.cast(y_true, tf.int32), logits, k=2), tf.float32)


MODEL = ModelSpec(build, metrics={"accuracy": accuracy, "top2_accuracy": top2_accuracy},
                  name="residual_cnn")
"""The builder with accuracy and top-2 accuracy (the default loss)."""


def main(output_dir: Optional[str] = None, rounds: int = 2, actors: Any = None) -> SimulationResult:
    """Two rounds of FedAvg on the bundled digits (8x8 images, 20 clients, 5 per
    round, 5 local epochs) with :data:`MODEL`; prints one line and returns the
    result."""
    cfg = SimConfig(clients=20, clients_per_round=5, rounds=rounds, local_epochs=5,
                    ray=RayConfig(workers=1), progress=False, checkpoint_every=0)
    result = run_simulation(cfg, output_dir, model=MODEL, actors=actors)
    last = result.metrics[-1]
    print(f"custom_model: {MODEL.name}, {result.summary['num_parameters']} parameters, "
          f"{rounds} rounds: test accuracy {last['eval_accuracy']:.3f}, top-2 "
          f"{last['eval_top2_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()

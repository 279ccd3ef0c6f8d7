"""Evaluation on one client's own test data, in the worker: the client side of
federated (and personalization) evaluation.

A :class:`ClientEvaluator` owns one copy of the model. :meth:`~ClientEvaluator.evaluate`
loads the global weights and returns, for one client, the sum of the spec's
per-example loss and each metric's numerator and denominator sums over the
client's test examples (:class:`ClientEval`); the driver turns many of them
into means and percentiles across clients
(:func:`fedsim.results.client_metrics.summarize_clients`).

Personalization (TFF's personalization evaluation): :meth:`~ClientEvaluator.personalize`
starts from the global weights and takes ``steps`` steps of plain SGD on the
mean loss of a minibatch of the client's TRAINING examples; step ``j`` uses
examples ``order[j*b:(j+1)*b]`` of the concatenated per-epoch permutations
(:func:`fedsim.client.local.epoch_order`), ``b = min(batch_size, n)``. The
personalized model is then evaluated like the global one. The global weights
the worker trains from are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

from fedsim.client.local import SignatureGraph, epoch_order
from fedsim.models.keras import FlatWeights
from fedsim.models.spec import ModelSpec, sum_batches
from fedsim.tasks.base import metric_parts


@dataclass(frozen=True)
class ClientEval:
    """One client's evaluation sums.

    cid: the client. num_examples: its test examples. loss_sum: sum over them
    of the per-example loss (its numerators, for a ratio loss). metrics: name ->
    (numerator sum, denominator sum). loss_den: the loss's denominator sum
    (None: ``num_examples``; a ratio loss counts e.g. tokens).
    """

    cid: int
    num_examples: int
    loss_sum: float
    metrics: dict[str, tuple[float, float]]
    loss_den: float | None = None


class ClientEvaluator:
    """Evaluates (and optionally personalizes) the global model on clients' data.

    model: the run's ModelSpec; batch_size: evaluation batch; train_batch_size
    and learning_rate: personalization's SGD batches and step size.
    """

    def __init__(self, model: ModelSpec, input_shape: Sequence[int], num_classes: int,
                 seed: int, batch_size: int = 256, train_batch_size: int = 10,
                 learning_rate: float = 0.1) -> None:
        self.spec = model
        self.model = model.build(input_shape, num_classes, seed)
        self.flat = FlatWeights(self.model.trainable_variables)
        self.batch_size = int(batch_size)
        self.train_batch_size = int(train_batch_size)
        self._lr = tf.constant(float(learning_rate), tf.float32)
        x_spec, y_spec = model.tensor_specs(input_shape)
        self._sums = SignatureGraph(self._sums_graph, [x_spec, y_spec])
        self._step = SignatureGraph(self._step_graph, [x_spec, y_spec])

    def _sums_graph(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        return self.spec.batch_sums(y, self.model(x, training=False))

    def _step_graph(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            num, den = metric_parts(self.spec.loss(y, self.model(x, training=True)))
            loss = tf.reduce_sum(num) / tf.maximum(tf.reduce_sum(den), 1e-12)
            if self.model.losses:
                loss += tf.add_n(self.model.losses)
        for var, g in zip(variables, tape.gradient(loss, variables)):
            if g is not None:
                var.assign_sub(self._lr * g)
        return loss

    def _evaluate_loaded(self, cid: int, x: np.ndarray, y: np.ndarray,
                         batch_size: int | None = None) -> ClientEval:
        loss, sums = sum_batches(self._sums, x, y, batch_size or self.batch_size)
        return ClientEval(int(cid), int(len(x)), float(loss[0]),
                          {k: (float(sums[k][0]), float(sums[k][1])) if k in sums else (0.0, 0.0)
                           for k in self.spec.metrics}, float(loss[1]))

    def evaluate(self, weights: np.ndarray, cid: int, x: np.ndarray, y: np.ndarray,
                 batch_size: int | None = None) -> ClientEval:
        """The model with ``weights`` on client ``cid``'s test examples ``x, y``
        (in batches of ``batch_size``; None: the evaluator's)."""
        self.flat.assign(weights)
        return self._evaluate_loaded(cid, x, y, batch_size)

    def personalize(self, weights: np.ndarray, cid: int, x_train: np.ndarray,
                    y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, steps: int,
                    rng: np.random.Generator) -> ClientEval:
        """``steps`` SGD steps from ``weights`` on the client's training examples
        (``rng`` shuffles them), then the evaluation on its test examples."""
        self.flat.assign(weights)
        n = len(x_train)
        b = min(self.train_batch_size, n)
        order = epoch_order(n, -(-steps * b // n), rng)
        for j in range(steps):
            idx = order[j * b:(j + 1) * b]
            self._step(x_train[idx], y_train[idx])
        return self._evaluate_loaded(cid, x_test, y_test)


CENTRAL_EVAL_BATCH = 1000
"""Examples per batch when the global model is evaluated on the centralized test split."""


def central_metrics(result: ClientEval) -> dict[str, float | None]:
    """The global model's row entries from its evaluation on the centralized test
    split: ``eval_loss`` (mean per example, or the ratio loss's numerator over
    its denominator) and ``eval_<metric>`` for each metric (numerator sum over
    denominator sum; None when the denominator is 0)."""
    den = result.loss_den if result.loss_den is not None else result.num_examples
    metrics = {f"eval_{k}": num / d if d else None for k, (num, d) in result.metrics.items()}
    return {"eval_loss": result.loss_sum / den, **metrics}


"""Local training of one virtual client: the ``client_update`` of FedAvg.

A :class:`LocalTrainer` owns one Keras model and trains any number of clients
with it, one after another: it loads the global weights, runs ``local_epochs``
passes of minibatch SGD on the mean of the spec's per-example loss
(:class:`fedsim.models.spec.ModelSpec`) over the client's examples in ONE compiled
``tf.function`` call (a graph loop over all steps, traced once per input shape),
and returns the client's update as TFF defines it::

    delta = global_weights - local_weights      (a pseudo-gradient)

together with the number of examples and the mean training loss. Usable
without Ray; :mod:`fedsim.engine.worker` wraps it in an actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

from fedsim.config import ClientConfig
from fedsim.models.keras import FlatWeights
from fedsim.models.spec import ModelSpec


@dataclass(frozen=True)
class ClientResult:
    """One client's contribution before aggregation.

    delta: float32 vector, global minus locally trained weights.
    num_examples: examples the client holds (the FedAvg weight).
    loss: mean training loss over the client's local steps, each step weighted
      by its batch size (so it is the mean per example seen).
    """

    delta: np.ndarray
    num_examples: int
    loss: float


def epoch_order(num_examples: int, epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Concatenated per-epoch permutations of ``range(num_examples)`` (int32)."""
    return np.concatenate([rng.permutation(num_examples) for _ in range(epochs)]).astype(np.int32)


class LocalTrainer:
    """Trains clients of one model (``model``, a ModelSpec) with SGD (optionally
    momentum).

    Each step's gradient is that of the batch's mean loss,
    ``sum(model.loss(y, logits)) / batch`` (for a loss given as per-example
    ``(numerator, denominator)``, e.g. the token losses of a sequence and its
    unmasked tokens, ``sum(numerators) / sum(denominators)``), plus the model's
    regularization losses (``model.losses``) if it has any; SGD with momentum m:
    ``v <- m * v + g; w <- w - lr * v``, with ``v`` reset to zero for every
    client (clients keep no state between rounds, as in TFF). ``seed`` seeds the
    model's initial weights (overwritten by the global weights in ``train``).
    """

    def __init__(self, model: ModelSpec, client_cfg: ClientConfig,
                 input_shape: Sequence[int], num_classes: int, batch_size: int,
                 local_epochs: int, seed: int = 0) -> None:
        self.spec = model
        self.model = model.build(input_shape, num_classes, seed)
        self.flat = FlatWeights(self.model.trainable_variables)
        self.batch_size = int(batch_size)
        self.local_epochs = int(local_epochs)
        self._lr = tf.constant(client_cfg.learning_rate, tf.float32)
        self._momentum = tf.constant(client_cfg.momentum, tf.float32)
        self._use_momentum = client_cfg.momentum > 0
        self._velocity = [tf.Variable(tf.zeros_like(v), trainable=False)
                          for v in self.model.trainable_variables]
        x_spec, y_spec = model.tensor_specs(input_shape)  # the data's layout
        self._train = tf.function(
            self._train_graph,
            input_signature=[tf.TensorSpec([None], tf.float32), x_spec, y_spec,
                             tf.TensorSpec([None], tf.int32)],
        )
        # FedProx's objective (an algorithm's ``proximal_mu``): its own graph, so that
        # plain FedAvg runs exactly the graph it always ran.
        self._train_prox = tf.function(
            self._train_graph,
            input_signature=[tf.TensorSpec([None], tf.float32), x_spec, y_spec,
                             tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32)],
        )

    @property
    def num_parameters(self) -> int:
        return self.flat.size

    def _train_graph(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                     order: tf.Tensor, mu: tf.Tensor | None = None
                     ) -> tuple[tf.Tensor, tf.Tensor]:
        """All local steps. With ``mu``, each step's gradient gains the proximal
        term's, ``mu (w - w_global)`` (the reported loss stays the model's)."""
        self.flat.assign(global_flat)
        anchors = ([tf.reshape(p, shape) for p, shape in
                    zip(tf.split(global_flat, self.flat.sizes), self.flat.shapes)]
                   if mu is not None else None)
        for v in self._velocity:
            v.assign(tf.zeros_like(v))
        n = tf.shape(x)[0]
        bs = tf.constant(self.batch_size, tf.int32)
        steps_per_epoch = (n + bs - 1) // bs
        total_loss = tf.constant(0.0, tf.float32)
        variables = self.model.trainable_variables
        for step in tf.range(steps_per_epoch * self.local_epochs):
            epoch = step // steps_per_epoch
            start = epoch * n + (step % steps_per_epoch) * bs
            stop = tf.minimum(start + bs, (epoch + 1) * n)
            idx = order[start:stop]
            xb = tf.gather(x, idx)
            yb = tf.gather(y, idx)
            with tf.GradientTape() as tape:
                out = self.spec.loss(yb, self.model(xb, training=True))
                if isinstance(out, (tuple, list)):  # (numerator, denominator) per example
                    num, den = (tf.reduce_sum(part) for part in out)
                    loss = num / tf.maximum(den, 1e-12)  # e.g. TFF's mean over real tokens
                    loss_sum = loss * tf.cast(stop - start, tf.float32)
                else:
                    loss_sum = tf.reduce_sum(out)
                    loss = loss_sum / tf.cast(stop - start, tf.float32)
                if self.model.losses:  # the model's regularizers, as Keras/TFF add them
                    loss += tf.add_n(self.model.losses)
            grads = tape.gradient(loss, variables)
            if anchors is not None:
                grads = [g + mu * (var - a) for g, var, a in zip(grads, variables, anchors)]
            for var, g, vel in zip(variables, grads, self._velocity):
                if self._use_momentum:
                    vel.assign(self._momentum * vel + g)
                    var.assign_sub(self._lr * vel)
                else:
                    var.assign_sub(self._lr * g)
            total_loss += loss_sum
        delta = global_flat - self.flat.get()
        seen = tf.cast(n * self.local_epochs, tf.float32)
        return delta, total_loss / tf.maximum(seen, 1.0)

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray,
              rng: np.random.Generator, proximal_mu: float = 0.0) -> ClientResult:
        """Train one client from ``global_weights``; ``rng`` shuffles its examples.

        ``proximal_mu`` > 0 (FedProx, sent by the algorithm): the local objective
        is the loss plus ``mu/2 ||w - w_global||^2``."""
        order = epoch_order(len(x), self.local_epochs, rng)
        if proximal_mu > 0:
            delta, loss = self._train_prox(global_weights, x, y, order,
                                           tf.constant(proximal_mu, tf.float32))
        else:
            delta, loss = self._train(global_weights, x, y, order)
        return ClientResult(delta=delta.numpy(), num_examples=int(len(x)), loss=float(loss))

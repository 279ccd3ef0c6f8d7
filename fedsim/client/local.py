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
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from fedsim.config import ClientConfig
from fedsim.models.keras import FlatWeights
from fedsim.models.spec import ModelSpec


@dataclass(frozen=True)
class ClientResult:
    """One client's contribution before aggregation.

    delta: float32 vector, global minus locally trained weights (may be a
      read-only view: the vectorized trainer's are rows of one result buffer).
    num_examples: examples the client holds (the FedAvg weight).
    loss: mean training loss over the client's local steps, each step weighted
      by its batch size (so it is the mean per example seen).
    full_gradient: with ``full_gradient=True`` (Mime-Lite), the gradient of the
      client's mean loss at the global weights (float32, over one pass in
      batches); otherwise None.
    """

    delta: np.ndarray
    num_examples: int
    loss: float
    full_gradient: Optional[np.ndarray] = None


def epoch_order(num_examples: int, epochs: int, rng: np.random.Generator) -> np.ndarray:
    """Concatenated per-epoch permutations of ``range(num_examples)`` (int32)."""
    return np.concatenate([rng.permutation(num_examples) for _ in range(epochs)]).astype(np.int32)


class SignatureGraph:
    """``tf.function(fn, input_signature=signature, **options)``, called through
    its one concrete function (traced on the first call) with every positional
    argument converted to its spec's dtype: the same graph and the same results,
    without the polymorphic function's per-call matching of the arguments
    against its traces (Python work that is a visible part of a small model's
    step). The trainers' and evaluators' per-client graphs are built with it."""

    def __init__(self, fn: Any, signature: Sequence[Any], **options: Any) -> None:
        self._function = tf.function(fn, input_signature=signature, **options)
        self._dtypes = [spec.dtype for spec in signature]
        self._concrete: Any = None

    def __call__(self, *args: Any) -> Any:
        if len(args) != len(self._dtypes):
            raise TypeError(f"expected {len(self._dtypes)} arguments, got {len(args)}")
        if self._concrete is None:
            self._concrete = self._function.get_concrete_function()
        return self._concrete(*[tf.convert_to_tensor(a, d) for a, d in zip(args, self._dtypes)])

    def experimental_get_tracing_count(self) -> int:
        """How many times the graph was traced (tf.function's count: at most 1)."""
        return self._function.experimental_get_tracing_count()


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
        self._specs = model.tensor_specs(input_shape)  # the data's layout
        self._graphs: dict[tuple[bool, bool, bool], Any] = {}
        self._train = self._graph(False, False, False)  # FedAvg's, traced first
        self._full_gradient = SignatureGraph(
            self._full_gradient_graph,
            [tf.TensorSpec([None], tf.float32), *self._specs, tf.TensorSpec([None], tf.int32)])

    def _graph(self, prox: bool, correct: bool, frozen: bool) -> Any:
        """The compiled training loop with the algorithm options it takes: each
        combination its own graph, so plain FedAvg runs exactly the graph it
        always ran."""
        key = (prox, correct, frozen)
        if key not in self._graphs:
            vec = tf.TensorSpec([None], tf.float32)
            signature = [vec, *self._specs, tf.TensorSpec([None], tf.int32)]
            signature += ([tf.TensorSpec([], tf.float32)] if prox else [])
            signature += [vec] * (int(correct) + int(frozen))

            def run(global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor, order: tf.Tensor,
                    *extra: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                it = iter(extra)
                return self._train_graph(global_flat, x, y, order,
                                         mu=next(it) if prox else None,
                                         correction=next(it) if correct else None,
                                         frozen_momentum=next(it) if frozen else None)

            self._graphs[key] = SignatureGraph(run, signature)
        return self._graphs[key]

    def _split(self, flat: tf.Tensor) -> list[tf.Tensor]:
        """A flat vector as tensors shaped like the trainable variables."""
        return [tf.reshape(p, shape) for p, shape in
                zip(tf.split(flat, self.flat.sizes), self.flat.shapes)]

    def _batch_loss(self, xb: tf.Tensor, yb: tf.Tensor, count: tf.Tensor
                    ) -> tuple[tf.Tensor, tf.Tensor]:
        """(the batch's mean training loss, plus regularizers; its sum over the
        batch's examples), for a GradientTape."""
        out = self.spec.loss(yb, self.model(xb, training=True))
        if isinstance(out, (tuple, list)):  # (numerator, denominator) per example
            num, den = (tf.reduce_sum(part) for part in out)
            loss = num / tf.maximum(den, 1e-12)  # e.g. TFF's mean over real tokens
            loss_sum = loss * tf.cast(count, tf.float32)
        else:
            loss_sum = tf.reduce_sum(out)
            loss = loss_sum / tf.cast(count, tf.float32)
        if self.model.losses:  # the model's regularizers, as Keras/TFF add them
            loss += tf.add_n(self.model.losses)
        return loss, loss_sum

    @property
    def num_parameters(self) -> int:
        return self.flat.size

    def _train_graph(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                     order: tf.Tensor, mu: tf.Tensor | None = None,
                     correction: tf.Tensor | None = None,
                     frozen_momentum: tf.Tensor | None = None
                     ) -> tuple[tf.Tensor, tf.Tensor]:
        """All local steps. Each step's gradient ``g`` of the batch's mean loss
        gains, with ``mu``, the proximal term's ``mu (w - w_global)`` and, with
        ``correction`` (flat), that vector (SCAFFOLD's ``c - c_i``); the step is
        then ``w <- w - lr (m a + g)`` with ``frozen_momentum`` ``a`` (flat; Mime's
        server momentum, never updated here; m the client momentum), else SGD
        with the client's own momentum. The reported loss stays the model's."""
        self.flat.assign(global_flat)
        anchors = self._split(global_flat) if mu is not None else None
        offsets = self._split(correction) if correction is not None else None
        frozen = self._split(frozen_momentum) if frozen_momentum is not None else None
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
            with tf.GradientTape() as tape:
                loss, loss_sum = self._batch_loss(tf.gather(x, idx), tf.gather(y, idx),
                                                  stop - start)
            grads = tape.gradient(loss, variables)
            if anchors is not None:
                grads = [g + mu * (var - a) for g, var, a in zip(grads, variables, anchors)]
            if offsets is not None:
                grads = [g + o for g, o in zip(grads, offsets)]
            if frozen is not None:
                for var, g, a in zip(variables, grads, frozen):
                    var.assign_sub(self._lr * (self._momentum * a + g))
            else:
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

    def _full_gradient_graph(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                             order: tf.Tensor) -> tf.Tensor:
        """The gradient of the mean loss at ``global_flat`` over one pass in
        batches of ``batch_size`` (in ``order``): ``sum_b |b| grad(mean loss_b) / n``,
        as TFF's Mime-Lite clients compute it (training mode)."""
        self.flat.assign(global_flat)
        n = tf.shape(x)[0]
        bs = tf.constant(self.batch_size, tf.int32)
        variables = self.model.trainable_variables
        total = [tf.zeros_like(v) for v in variables]
        for start in tf.range(0, n, bs):
            stop = tf.minimum(start + bs, n)
            idx = order[start:stop]
            with tf.GradientTape() as tape:
                loss, _ = self._batch_loss(tf.gather(x, idx), tf.gather(y, idx), stop - start)
            count = tf.cast(stop - start, tf.float32)
            total = [t + g * count for t, g in zip(total, tape.gradient(loss, variables))]
        flat = tf.concat([tf.reshape(t, [-1]) for t in total], axis=0)
        return tf.math.divide_no_nan(flat, tf.cast(n, tf.float32))

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray,
              rng: np.random.Generator, proximal_mu: float = 0.0,
              correction: Optional[np.ndarray] = None,
              frozen_momentum: Optional[np.ndarray] = None,
              full_gradient: bool = False) -> ClientResult:
        """Train one client from ``global_weights``; ``rng`` shuffles its examples.

        The options an algorithm asks for (:func:`fedsim.client.features.trainer_features`):
        ``proximal_mu`` > 0 (FedProx): the local objective is the loss plus
        ``mu/2 ||w - w_global||^2``; ``correction`` (SCAFFOLD's ``c - c_i``, flat):
        added to every step's gradient; ``frozen_momentum`` (Mime-Lite's server
        momentum, flat): every step is ``w <- w - lr (momentum * a + g)`` with it
        fixed; ``full_gradient``: also return the gradient of the mean loss at
        ``global_weights`` (computed first, over the first epoch's order)."""
        order = epoch_order(len(x), self.local_epochs, rng)
        full = (self._full_gradient(global_weights, x, y, order[:len(x)]).numpy()
                if full_gradient else None)
        extra: list[Any] = []
        if proximal_mu > 0:
            extra.append(tf.constant(proximal_mu, tf.float32))
        for vec in (correction, frozen_momentum):
            if vec is not None:
                extra.append(np.asarray(vec, np.float32))
        graph = self._graph(proximal_mu > 0, correction is not None, frozen_momentum is not None)
        delta, loss = graph(global_weights, x, y, order, *extra)
        return ClientResult(delta=delta.numpy(), num_examples=int(len(x)), loss=float(loss),
                            full_gradient=full)

    def train_in_order(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray,
                       order: np.ndarray) -> ClientResult:
        """Plain SGD on one client whose shuffling is already drawn: ``order`` is
        :func:`epoch_order`'s ``(local_epochs * len(x),)`` indices. The same graph
        as ``train`` with no options, which draws the order from its ``rng``."""
        delta, loss = self._train(global_weights, x, y, order)
        return ClientResult(delta=delta.numpy(), num_examples=int(len(x)), loss=float(loss))

"""The server: global model, server optimizer, aggregator state, cohort sampling.

:class:`Server` is plain Python (usable without Ray); the simulation runs it as
a Ray actor. Per round it:

1. samples the cohort (:func:`fedsim.sampling.sample_clients`, seeded per round);
2. hands out the global weights (one flat float32 vector) and the aggregator's
   client parameters (e.g. the clip norm);
3. merges the workers' partial sums, lets the aggregator finalize them (noise is
   added there, once), and applies the server optimizer to the result;
4. evaluates the global model on the centralized test split when asked.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from fedsim.aggregation import build_aggregator
from fedsim.config import SimConfig
from fedsim.optimizers import ServerOptimizer
from fedsim.outputs import memory_mib
from fedsim.sampling import STREAM_NOISE, STREAM_SAMPLING, sample_clients, stream
from fedsim.worker import WorkerReport, configure_tensorflow


class Server:
    def __init__(self, cfg: SimConfig, input_shape: Sequence[int], num_classes: int,
                 x_test: np.ndarray, y_test: np.ndarray, num_cpus: float = 1.0) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        configure_tensorflow(num_cpus)
        import tensorflow as tf

        from fedsim.models import FlatWeights, build_model

        self.cfg = cfg
        self.model = build_model(cfg.model, input_shape, num_classes, cfg.seed)
        self._flat = FlatWeights(self.model.trainable_variables)
        self.weights = self._flat.get().numpy()
        self.optimizer = ServerOptimizer(cfg.server)
        self.opt_state = self.optimizer.initial_state(self.weights.size)
        self.aggregator = build_aggregator(cfg)
        self.agg_state = self.aggregator.initial_state()
        self.x_test = x_test
        self.y_test = y_test
        loss = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.SUM)

        def _eval_batch(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            logits = self.model(x, training=False)
            correct = tf.reduce_sum(tf.cast(tf.equal(
                tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.float32))
            return loss(y, logits), correct

        self._eval_batch = tf.function(_eval_batch, input_signature=[
            tf.TensorSpec([None, *input_shape], tf.float32), tf.TensorSpec([None], tf.int32)])

    def num_parameters(self) -> int:
        return int(self.weights.size)

    def sample(self, round_num: int) -> np.ndarray:
        """The cohort of ``round_num`` (sorted client ids)."""
        return sample_clients(self.cfg.clients, self.cfg.clients_per_round, self.cfg.sampling,
                              stream(self.cfg.seed, STREAM_SAMPLING, round_num))

    def global_weights(self) -> np.ndarray:
        return self.weights

    def client_params(self) -> dict[str, Any]:
        return self.aggregator.client_params(self.agg_state)

    def apply(self, round_num: int, num_sampled: int, *reports: WorkerReport) -> dict[str, float]:
        """Merge the workers' partial sums and take one server optimizer step.

        Returns the round's training measurements: ``train_loss`` (mean per
        example over the cohort's local training), ``num_examples``,
        ``clients`` (that reported) and the aggregator's own measurements.
        """
        partial = self.aggregator.zero_partial(self.weights.size)
        loss_sum, examples, clients = 0.0, 0, 0
        for r in reports:
            partial = self.aggregator.merge(partial, r.partial)
            loss_sum += r.loss_sum
            examples += r.num_examples
            clients += r.num_clients
        update, self.agg_state, measurements = self.aggregator.finalize(
            self.agg_state, partial, num_sampled, stream(self.cfg.seed, STREAM_NOISE, round_num))
        self.opt_state, self.weights = self.optimizer.step(self.opt_state, self.weights, update)
        out = {"train_loss": loss_sum / examples if examples else float("nan"),
               "num_examples": examples, "clients": clients,
               "update_norm": float(np.linalg.norm(update))}
        out.update(measurements)
        return out

    def memory(self) -> dict[str, float]:
        return memory_mib()

    def evaluate(self, batch_size: int = 1000) -> dict[str, float]:
        """Loss (mean per example) and accuracy of the global model on the test split."""
        self._flat.assign(self.weights)
        loss, correct, n = 0.0, 0.0, len(self.x_test)
        for s in range(0, n, batch_size):
            lb, cb = self._eval_batch(self.x_test[s:s + batch_size], self.y_test[s:s + batch_size])
            loss += float(lb)
            correct += float(cb)
        return {"eval_loss": loss / n, "eval_accuracy": correct / n}

"""A task of your own, outside fedsim: next-token prediction on your own
sequences with a SUBCLASSED Keras model (which TFF's ``from_keras_model``
rejects), evaluated on every client's own test data.

Three parts, each plain Python:

- ``CountingClients``: a population whose client ``c`` writes sequences that
  count upwards modulo the vocabulary (from its own random starting points),
  odd clients padding the last two positions. It has ``client`` (training
  examples) and ``client_test`` (the same client's own test examples), so
  federated evaluation can visit it.
- ``TinyLM``: a subclassed ``tf.keras.Model`` (embedding -> GRU -> dense
  logits over the vocabulary at every position).
- ``make_data``: the :class:`fedsim.data.base.FederatedData`, its task a
  :class:`fedsim.tasks.next_token.NextTokenPrediction` (padding id 0 masked
  from the accuracy).

From Python (``main`` below), or from the command line with the model alone
(the data there is a built-in dataset of sequences, e.g. ``task=shakespeare_cnp``
with ``model.builder=examples.custom_task:build``).

    uv run python examples/custom_task.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make `fedsim` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsim.config import FederatedEvalConfig, RayConfig, SimConfig  # noqa: E402
from fedsim.data.base import FederatedData  # noqa: E402
from fedsim.simulation import SimulationResult, run_simulation  # noqa: E402
from fedsim.tasks.next_token import NextTokenPrediction  # noqa: E402

VOCAB, LENGTH = 12, 8  # token 0 pads


@dataclass(frozen=True)
class CountingClients:
    """``n`` clients; client ``c`` holds ``3 + c % 4`` training and as many test
    sequences, generated on request from ``(c, split)``."""

    n: int

    def _sequences(self, cid: int, split: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([cid, split])
        start = rng.integers(1, VOCAB, size=(3 + cid % 4, 1))
        seq = (start + np.arange(LENGTH + 1)) % (VOCAB - 1) + 1  # ids 1 .. VOCAB-1
        if cid % 2:
            seq[:, -2:] = 0
        return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32)

    @property
    def num_clients(self) -> int:
        return self.n

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return self._sequences(cid, 0)

    def client_test(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return self._sequences(cid, 1)


def make_data(num_clients: int = 20) -> FederatedData:
    """The population, with the union of its clients' test data as the central split."""
    train = CountingClients(num_clients)
    x, y = map(np.concatenate, zip(*(train.client_test(c) for c in range(num_clients))))
    return FederatedData(train, x, y, num_classes=VOCAB, input_shape=(LENGTH,),
                         name="counting", task=NextTokenPrediction(pad=0))


def _tiny_lm_class() -> Any:
    import tensorflow as tf

    class TinyLM(tf.keras.Model):
        """Embedding (padding masked) -> GRU over the sequence -> logits per position."""

        def __init__(self, vocab: int, seed: int) -> None:
            super().__init__(name="tiny_lm")
            init = tf.keras.initializers.GlorotUniform
            self.embed = tf.keras.layers.Embedding(vocab, 8, mask_zero=True,
                                                   embeddings_initializer=init(seed))
            self.rnn = tf.keras.layers.GRU(16, return_sequences=True,
                                           kernel_initializer=init(seed + 1),
                                           recurrent_initializer=tf.keras.initializers.
                                           Orthogonal(seed=seed + 2))
            self.out = tf.keras.layers.Dense(vocab, kernel_initializer=init(seed + 3))

        def call(self, tokens, training=False):  # (no annotations: autograph converts it)
            return self.out(self.rnn(self.embed(tokens), training=training))

    return TinyLM


def build(input_shape: Sequence[int], num_classes: int, seed: int) -> Any:
    """The subclassed model for token sequences of ``input_shape`` over a
    vocabulary of ``num_classes``; fedsim builds it on a zero batch."""
    return _tiny_lm_class()(num_classes, seed)


def main(output_dir: Optional[str] = None, rounds: int = 3, actors: Any = None,
         personalization_steps: int = 2) -> SimulationResult:
    cfg = SimConfig(clients=20, clients_per_round=5, rounds=rounds, local_epochs=2,
                    batch_size=4, progress=False, ray=RayConfig(workers=2),
                    federated_eval=FederatedEvalConfig(
                        clients="all", personalization_steps=personalization_steps))
    cfg.client.learning_rate = 0.5
    return run_simulation(cfg, output_dir, data=make_data(cfg.clients), model=build,
                          actors=actors)


if __name__ == "__main__":
    res = main("outputs/custom_task" if len(sys.argv) < 2 else sys.argv[1])
    final = res.summary["final"]
    print(f"token accuracy {final['eval_accuracy']:.3f}; clients' 10th/50th/90th percentile "
          f"{final['fed_accuracy_p10']:.3f}/{final['fed_accuracy_p50']:.3f}/"
          f"{final['fed_accuracy_p90']:.3f}; personalized median {final['pers_accuracy_p50']:.3f}")

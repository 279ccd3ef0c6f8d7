"""Your own federated dataset in a simulation, without touching fedsim.

fedsim asks two things of the clients' data (:class:`fedsim.data.base.ClientData`):
``num_clients``, and ``client(cid) -> (x, y)`` (x float32 ``(n, *input_shape)``,
y int32 ``(n,)``, n >= 1). Wrap it, with a central test split, in a
:class:`fedsim.data.base.FederatedData` and pass it as ``data=``::

    uv run python examples/custom_data.py

Here the examples are one numpy array (a mixture of 10 Gaussian classes in 16
dimensions, drawn from a seed) split with label skew, as McMahan et al. split
MNIST: sort by label, cut into ``2 * num_clients`` shards, give each client two
shards, so most clients see only two classes. The object is pickled once into
Ray's object store and shared by every worker, so keep it to numpy arrays and
plain values (no open files or locks; open those lazily inside ``client``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from fedsim.config import ModelConfig, RayConfig, SimConfig
from fedsim.data.base import FederatedData
from fedsim.simulation import SimulationResult, run_simulation

NUM_CLASSES = 10
DIM = 16


class LabelSkewClients:
    """Clients cut from arrays ``x``, ``y`` with label skew: the examples sorted by
    label are cut into ``shards_per_client * num_clients`` equal shards and each
    client gets ``shards_per_client`` of them, drawn without replacement from
    ``seed``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_clients: int,
                 shards_per_client: int = 2, seed: int = 0) -> None:
        self.x = np.asarray(x, np.float32)
        self.y = np.asarray(y, np.int32)
        rng = np.random.default_rng(seed)
        by_label = np.argsort(self.y, kind="stable")
        shards = np.array_split(by_label, num_clients * shards_per_client)
        picks = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
        self.rows = [np.sort(np.concatenate([shards[s] for s in p])) for p in picks]

    @property
    def num_clients(self) -> int:
        return len(self.rows)

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows[int(cid)]
        return self.x[rows], self.y[rows]


def gaussian_classes(n: int, rng: np.random.Generator,
                     centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples: label uniform, x = its class centre + N(0, 1) noise."""
    y = rng.integers(0, len(centers), size=n).astype(np.int32)
    x = (centers[y] + rng.normal(size=(n, centers.shape[1]))).astype(np.float32)
    return x, y


def make_data(num_clients: int = 20, examples_per_client: int = 50, test_examples: int = 500,
              seed: int = 0) -> FederatedData:
    """The label-skewed clients and an IID test split from the same classes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=1.5, size=(NUM_CLASSES, DIM))
    x, y = gaussian_classes(num_clients * examples_per_client, rng, centers)
    x_test, y_test = gaussian_classes(test_examples, rng, centers)
    return FederatedData(train=LabelSkewClients(x, y, num_clients, seed=seed),
                         x_test=x_test, y_test=y_test, num_classes=NUM_CLASSES,
                         input_shape=(DIM,), name="label_skew_gaussians")


def main(output_dir: Optional[str] = None, rounds: int = 2, actors: Any = None) -> SimulationResult:
    """Two rounds of FedAvg of a small MLP on :func:`make_data`'s 20 clients, 5 per
    round; prints one line and returns the result."""
    data = make_data(num_clients=20)
    cfg = SimConfig(clients=data.train.num_clients, clients_per_round=5, rounds=rounds,
                    local_epochs=2, model=ModelConfig(name="mlp", hidden=[32]),
                    ray=RayConfig(workers=1), progress=False, checkpoint_every=0)
    result = run_simulation(cfg, output_dir, data=data, actors=actors)
    print(f"custom_data: {data.name}, {cfg.clients} clients, {len(data.y_test)} test "
          f"examples, {rounds} rounds: test accuracy {result.metrics[-1]['eval_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()

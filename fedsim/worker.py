"""Client worker actors: each one simulates many virtual clients.

A fixed pool of :class:`ClientWorker` actors (never one actor per client) is
created once. Each worker builds its Keras model once, gets its shard of the
round's cohort plus ONE object-store reference to the global weights per round,
trains its clients one after another with :class:`fedsim.client.LocalTrainer`,
and folds each update into a partial sum with the aggregator's ``accumulate``
(clipping happens there, in the worker). It returns that single
:class:`fedsim.aggregation.Partial` plus training statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fedsim.aggregation import Partial
from fedsim.config import SimConfig
from fedsim.data import ClientData
from fedsim.outputs import memory_mib
from fedsim.sampling import STREAM_SHUFFLE, stream


@dataclass(frozen=True)
class WorkerReport:
    """What a worker sends back for one round.

    partial: the aggregator's partial sum over this worker's clients.
    loss_sum: sum over clients of (mean training loss * num_examples).
    num_examples: examples trained on (each counted once, not per epoch).
    num_clients: clients trained.
    """

    partial: Partial
    loss_sum: float
    num_examples: int
    num_clients: int


def configure_tensorflow(num_cpus: float) -> None:
    """Size TF's thread pools to the CPUs Ray gives this process, and let it
    share GPUs (memory growth), before TF runs any op."""
    import tensorflow as tf

    threads = max(1, int(num_cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # TF already initialised in this process (e.g. a test)
        pass


class ClientWorker:
    """Simulates virtual clients; plain Python, wrapped by Ray in :func:`make_pool`."""

    def __init__(self, cfg: SimConfig, client_data: ClientData, input_shape: Sequence[int],
                 num_classes: int, num_cpus: float = 1.0) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        configure_tensorflow(num_cpus)
        from fedsim.aggregation import build_aggregator
        from fedsim.client import LocalTrainer

        self.cfg = cfg
        self.data = client_data
        self.aggregator = build_aggregator(cfg)
        self.trainer = LocalTrainer(cfg.model, cfg.client, input_shape, num_classes,
                                    cfg.batch_size, cfg.local_epochs, seed=cfg.seed)

    def train_round(self, round_num: int, weights: np.ndarray, params: Mapping[str, Any],
                    client_ids: Sequence[int]) -> WorkerReport:
        """Train ``client_ids`` from ``weights`` and return their partial sum.

        Client ``c`` shuffles with the stream ``(seed, SHUFFLE, round, c)``, so its
        update does not depend on which worker trains it.
        """
        partial = self.aggregator.zero_partial(self.trainer.num_parameters)
        loss_sum, examples = 0.0, 0
        for cid in client_ids:
            x, y = self.data.client(int(cid))
            result = self.trainer.train(weights, x, y, stream(self.cfg.seed, STREAM_SHUFFLE,
                                                              round_num, int(cid)))
            partial = self.aggregator.accumulate(params, partial, result.delta,
                                                 result.num_examples)
            loss_sum += result.loss * result.num_examples
            examples += result.num_examples
        return WorkerReport(partial, loss_sum, examples, len(client_ids))

    def ping(self) -> bool:
        return True

    def memory(self) -> dict[str, float]:
        return memory_mib()


def pool_size(cfg: SimConfig, cluster_cpus: float) -> int:
    """Workers to start: ``ray.workers``, or as many as the CPUs hold (at least 1)."""
    if cfg.ray.workers > 0:
        return cfg.ray.workers
    return max(1, int(cluster_cpus // cfg.ray.cpus_per_worker))


def make_pool(cfg: SimConfig, data_ref: Any, input_shape: Sequence[int], num_classes: int,
              size: int) -> list[Any]:
    """Start ``size`` worker actors with the configured CPU/GPU resources."""
    import ray

    actor_cls = ray.remote(num_cpus=cfg.ray.cpus_per_worker,
                           num_gpus=cfg.ray.gpus_per_worker)(ClientWorker)
    return [actor_cls.remote(cfg, data_ref, tuple(input_shape), num_classes,
                             cfg.ray.cpus_per_worker) for _ in range(size)]

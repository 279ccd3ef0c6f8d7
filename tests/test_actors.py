"""The server and worker actors on a real local Ray: one FedAvg round equals the
hand-computed example-weighted mean of the clients' deltas."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.client.local import LocalTrainer
from fedsim.config import ModelConfig, RayConfig, SimConfig
from fedsim.data.loaders import load_federated_data
from fedsim.engine.parts import resolve_parts
from fedsim.engine.server import Server
from fedsim.engine.worker import ClientWorker
from fedsim.models.spec import model_spec
from fedsim.rng import STREAM_SHUFFLE, stream


def test_one_round_on_ray_equals_hand_computed_fedavg(ray_local):
    ray = ray_local
    cfg = SimConfig(clients=12, clients_per_round=5, rounds=1, local_epochs=2, batch_size=8,
                    model=ModelConfig(name="logreg"), ray=RayConfig(workers=2), seed=3)
    data = load_federated_data(cfg.data, cfg.clients, cfg.seed)
    server = ray.remote(num_cpus=0)(Server).remote(cfg, resolve_parts(cfg), data.input_shape,
                                                   data.num_classes, data.x_test, data.y_test)
    data_ref = ray.put(data.train)
    workers = [ray.remote(num_cpus=1)(ClientWorker).remote(cfg, resolve_parts(cfg), data_ref,
                                                           data.input_shape, data.num_classes)
               for _ in range(2)]
    w0 = ray.get(server.global_weights.remote())
    cohort = ray.get(server.sample.remote(1))
    assert len(cohort) == 5 and len(set(cohort.tolist())) == 5
    weights_ref = server.global_weights.remote()
    params_ref = server.client_params.remote()
    shards = np.array_split(cohort, 2)
    reports = [w.train_round.remote(1, weights_ref, params_ref, s) for w, s in zip(workers, shards)]
    measured = ray.get(server.apply.remote(1, len(cohort), *reports))
    w1 = ray.get(server.global_weights.remote())

    # Hand computation, in this process, client by client.
    trainer = LocalTrainer(model_spec(cfg.model), cfg.client, data.input_shape, data.num_classes,
                           cfg.batch_size, cfg.local_epochs)
    deltas, counts = [], []
    for cid in cohort:
        x, y = data.train.client(int(cid))
        r = trainer.train(w0, x, y, stream(cfg.seed, STREAM_SHUFFLE, 1, int(cid)))
        deltas.append(r.delta.astype(np.float64))
        counts.append(r.num_examples)
    mean = sum(n * d for n, d in zip(counts, deltas)) / sum(counts)
    assert measured["clients"] == 5 and measured["num_examples"] == sum(counts)
    assert np.linalg.norm(mean) > 1e-3
    np.testing.assert_allclose(w1, w0 - mean, rtol=1e-5, atol=1e-6)  # server SGD, lr 1.0
    for a in workers + [server]:
        ray.kill(a)


def test_plain_state_nesting_is_tf_nests():
    """Without TensorFlow the server flattens and restores an aggregator's state
    itself: in tf.nest's order (mappings by sorted key, sequences and namedtuples
    in order), back to the same structure, 0-d leaves as Python scalars."""
    import collections

    import tensorflow as tf

    from fedsim.engine.server import flatten_plain, pack_plain

    Pair = collections.namedtuple("Pair", "b a")
    state = {"z": np.arange(3), "a": [np.float32(1.5), (np.int64(2), {"y": 4, "x": 5})],
             "m": Pair(np.zeros(2), collections.OrderedDict([("q", 1), ("p", 2)]))}
    leaves = flatten_plain(state)
    assert [np.asarray(v).tolist() for v in leaves] == \
        [np.asarray(v).tolist() for v in tf.nest.flatten(state)]
    back = pack_plain(state, [np.asarray(v) for v in leaves])
    assert all(tf.nest.flatten(tf.nest.map_structure(np.array_equal, back, state)))
    assert type(back["m"]) is Pair and list(back["m"][1]) == ["q", "p"]
    assert isinstance(back["a"][0], float) and isinstance(back["a"][1][1]["x"], int)
    with pytest.raises(ValueError, match="has 7 leaves, the aggregator's structure 8"):
        pack_plain(state, leaves[:-1])


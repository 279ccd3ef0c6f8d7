"""Whole simulations through the library API on a real local Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import small_config, without_timings

from fedsim.config import DataConfig, ModelConfig
from fedsim.engine.parts import resolve_parts
from fedsim.errors import FedsimError
from fedsim.results.outputs import read_metrics
from fedsim.simulation import run_simulation


def test_same_seed_gives_identical_metrics(warm_actors, tmp_path):
    a = run_simulation(small_config(seed=5, tensorboard=True), tmp_path / "a", actors=warm_actors)
    b = run_simulation(small_config(seed=5), tmp_path / "b", actors=warm_actors)
    c = run_simulation(small_config(seed=6), tmp_path / "c", actors=warm_actors)
    ra = without_timings(read_metrics(tmp_path / "a" / "metrics.jsonl"))
    rb = without_timings(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert ra == rb
    assert (a.weights == b.weights).all()  # the final models too, bit for bit
    assert ra != without_timings(c.metrics)
    assert [r["round"] for r in ra] == [1, 2, 3]
    for r in ra:
        assert {"train_loss", "eval_loss", "eval_accuracy", "clients", "round_seconds"} <= set(
            a.metrics[r["round"] - 1])
        assert r["clients"] == 5
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["config"]["seed"] == 5 and "tensorflow" in summary["versions"]
    assert (tmp_path / "a" / "metrics.png").stat().st_size > 10_000
    # tensorboard=true: the same per-round scalars as TensorBoard events.
    import tensorflow as tf

    logged = {}
    for path in (tmp_path / "a" / "tb").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                logged[v.tag, event.step] = float(tf.make_ndarray(v.tensor))
    for r in ra:
        assert logged["eval_accuracy", r["round"]] == pytest.approx(r["eval_accuracy"])
        assert logged["train_loss", r["round"]] == pytest.approx(r["train_loss"])
    assert not (tmp_path / "b" / "tb").exists()


def test_training_learns_and_poisson_cohorts_vary(warm_actors):
    res = run_simulation(small_config(rounds=8, clients_per_round=8, sampling="poisson",
                                local_epochs=3, eval_every=4,
                                model=ModelConfig(name="mlp", hidden=[32])), actors=warm_actors)
    sizes = [r["clients"] for r in res.metrics]
    assert len(set(sizes)) > 1  # Poisson cohort sizes vary
    assert [r["eval_accuracy"] is None for r in res.metrics] == [True, True, True, False] * 2
    assert res.metrics[-1]["eval_accuracy"] > 0.5  # far above chance (0.1)


def test_min_sep_cohorts_run_and_the_summary_describes_them(warm_actors):
    """sampling=min_sep through the server actor: 20 clients in 4 groups of 5, each
    round takes its whole group (pure checks of the schemes: test_sampling_schemes.py)."""
    from fedsim.config import SamplingConfig

    res = run_simulation(small_config(rounds=5, sampling=SamplingConfig("min_sep", 4)),
                         actors=warm_actors)
    assert [r["clients"] for r in res.metrics] == [5] * 5
    assert res.summary["sampling"] == {"scheme": "min_sep", "min_sep": 4,
                                       "max_participations": 2}
    assert res.summary["config"]["sampling"] == {"scheme": "min_sep", "min_sep": 4}


def test_large_synthetic_population_runs_with_flat_memory(warm_actors):
    res = run_simulation(small_config(clients=10_000, clients_per_round=10, rounds=2,
                                data=DataConfig(name="synthetic", test_clients=20)),
                         actors=warm_actors)
    assert [r["clients"] for r in res.metrics] == [10, 10]
    assert res.summary["data"]["name"] == "synthetic"


def test_bad_output_dir_is_refused_before_anything_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FedsimError, match="cannot write"):
        run_simulation(small_config(), blocker / "run")
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    with pytest.raises(FedsimError, match="already holds a run"):
        run_simulation(small_config(), done)
    assert json.loads((done / "summary.json").read_text()) == {}


def test_vectorized_clients_give_the_same_round_as_one_at_a_time():
    """In process (the actors' classes, no Ray): a worker training its shard
    ``vectorize`` clients per call reports what it reports one at a time."""
    from fedsim.config import ClientConfig
    from fedsim.data.loaders import load_federated_data
    from fedsim.engine.server import Server
    from fedsim.engine.worker import ClientWorker

    reports = []
    for vectorize in (1, 4):
        cfg = small_config(model=ModelConfig(name="mlp", hidden=[16]),
                           client=ClientConfig(momentum=0.5, vectorize=vectorize))
        data = load_federated_data(cfg.data, cfg.clients, cfg.seed)
        server = Server(cfg, resolve_parts(cfg), data.input_shape, data.num_classes,
                        data.x_test, data.y_test)
        worker = ClientWorker(cfg, resolve_parts(cfg), data.train, data.input_shape,
                              data.num_classes)
        ids = server.plan(1).reporting
        assert len(ids) == 5  # more than one chunk of 4
        reports.append(worker.train_round(1, server.global_weights(), server.client_params(),
                                          ids))
    one, many = reports
    # Same per-client mathematics; only the order of float sums differs.
    np.testing.assert_allclose(many.partial.total, one.partial.total, rtol=0, atol=2e-5)
    assert (many.num_clients, many.num_examples) == (one.num_clients, one.num_examples)
    assert many.loss_sum == pytest.approx(one.loss_sum, rel=1e-4)
    assert np.abs(one.partial.total).max() > 1e-3  # the clients really trained


def test_unpicklable_model_or_data_is_refused_before_any_actor_starts(tmp_path):
    import dataclasses
    import threading

    from fedsim.data.loaders import load_federated_data
    from fedsim.errors import ConfigError

    lock = threading.Lock()

    def locked_builder(input_shape, num_classes, seed):
        with lock:
            return None

    cfg = small_config()
    with pytest.raises(FedsimError) as err:
        run_simulation(cfg, tmp_path / "a", model=locked_builder)
    msg = str(err.value)
    assert msg.startswith("model=: cannot be sent to the Ray actors, it does not pickle "
                          "(TypeError: cannot pickle '_thread.lock' object)") and "\n" not in msg

    class LockedClients:
        def __init__(self, inner):
            self.inner, self.lock = inner, threading.Lock()
            self.num_clients = inner.num_clients

        def client(self, cid):
            with self.lock:
                return self.inner.client(cid)

    data = load_federated_data(cfg.data, cfg.clients, cfg.seed)
    with pytest.raises(FedsimError, match=r"^data=: cannot be sent to the Ray actors, .*_thread"
                                          r"\.lock"):
        run_simulation(cfg, tmp_path / "b", data=dataclasses.replace(
            data, train=LockedClients(data.train)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match=r"^clients=20: allowed is at most "
                                          r"data.train.num_clients=5"):
        run_simulation(cfg, data=load_federated_data(cfg.data, 5, cfg.seed))
    with pytest.raises(ConfigError, match=r"^data=dict: allowed is a fedsim.data.base"):
        run_simulation(cfg, data={})

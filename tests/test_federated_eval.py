"""Federated and personalization evaluation end to end (real Ray actors): a
user's task outside fedsim (examples/custom_task.py: next-token prediction,
a subclassed Keras model), its per-client results recomputed here by hand
from the final weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from examples import custom_task
from fedsim.client.local import epoch_order
from fedsim.config import FederatedEvalConfig, ModelConfig, RayConfig, SimConfig
from fedsim.errors import ConfigError
from fedsim.rng import STREAM_PERSONALIZE, stream
from fedsim.simulation import run_simulation


def _model_with(weights):
    import tensorflow as tf

    from fedsim.models.keras import FlatWeights

    model = custom_task.build((custom_task.LENGTH,), custom_task.VOCAB, 0)
    model(tf.zeros([1, custom_task.LENGTH], tf.int32))
    FlatWeights(model.trainable_variables).assign(tf.constant(weights))
    return model


def _token_accuracy(model, x, y):
    """By hand: correct unpadded next tokens over unpadded tokens."""
    predicted = np.argmax(model(x).numpy(), axis=-1)
    keep = y != 0
    return (predicted == y)[keep].sum(), keep.sum()


@pytest.fixture(scope="module")
def run(warm_actors, tmp_path_factory):
    out = tmp_path_factory.mktemp("fedeval")
    return custom_task.main(str(out), rounds=2, actors=warm_actors), out


def test_client_percentiles_and_means_equal_a_hand_computation(run):
    res, out = run
    final = res.metrics[-1]
    model = _model_with(res.weights)
    data = custom_task.make_data(20)
    per_client, hits, counted = [], 0, 0
    for c in range(20):
        h, n = _token_accuracy(model, *data.train.client_test(c))
        per_client.append(h / n)
        hits, counted = hits + h, counted + n
    assert final["fed_clients"] == 20
    assert final["fed_accuracy"] == pytest.approx(hits / counted, abs=1e-9)
    assert final["fed_accuracy_mean"] == pytest.approx(np.mean(per_client), abs=1e-9)
    for q in (10, 50, 90):
        assert final[f"fed_accuracy_p{q}"] == pytest.approx(np.percentile(per_client, q),
                                                            abs=1e-9)
    # The central split is the union of the clients' test data: the same token accuracy.
    assert final["eval_accuracy"] == pytest.approx(final["fed_accuracy"], abs=1e-9)
    assert np.percentile(per_client, 90) > np.percentile(per_client, 10)  # not degenerate
    # summary.json carries the final federated view; client_eval.jsonl the per-client one.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["fed_accuracy_p50"] == final["fed_accuracy_p50"]
    assert summary["task"] == "next_token" and summary["primary_metric"] == "eval_accuracy"
    rows = [json.loads(line) for line in (out / "client_eval.jsonl").read_text().splitlines()]
    last = {r["client"]: r for r in rows if r["round"] == 2 and r["kind"] == "fed"}
    assert sorted(last) == list(range(20))
    np.testing.assert_allclose([last[c]["accuracy"] for c in range(20)], per_client, atol=1e-9)
    assert {r["round"] for r in rows} == {1, 2} and (out / "metrics.png").stat().st_size > 0


def test_personalization_is_k_sgd_steps_on_the_clients_own_training_data(run):
    """Client 3 after round 2, by hand: 2 steps of plain SGD (batch 4, rate 0.5)
    from the global model on its training sequences in the order of its
    PERSONALIZE stream, then its test token accuracy."""
    import tensorflow as tf

    res, out = run
    rows = [json.loads(line) for line in (out / "client_eval.jsonl").read_text().splitlines()]
    pers = {r["client"]: r for r in rows if r["round"] == 2 and r["kind"] == "pers"}
    data = custom_task.make_data(20)
    task = data.task
    for cid in (3, 6):
        model = _model_with(res.weights)
        x, y = data.train.client(cid)
        b = min(4, len(x))
        order = epoch_order(len(x), -(-2 * b // len(x)), stream(0, STREAM_PERSONALIZE, 2, cid))
        for j in range(2):
            idx = order[j * b:(j + 1) * b]
            with tf.GradientTape() as tape:
                # TFF's loss: the mean over the tokens the model's mask keeps
                num, den = task.default_loss()(y[idx], model(x[idx], training=True))
                loss = tf.reduce_sum(num) / tf.reduce_sum(den)
            for v, g in zip(model.trainable_variables,
                            tape.gradient(loss, model.trainable_variables)):
                v.assign_sub(0.5 * tf.convert_to_tensor(g))
        h, n = _token_accuracy(model, *data.train.client_test(cid))
        assert pers[cid]["accuracy"] == pytest.approx(h / n, abs=1e-9)
    final = res.metrics[-1]
    assert final["pers_clients"] == 20
    assert final["pers_accuracy_p50"] == pytest.approx(
        np.percentile([pers[c]["accuracy"] for c in range(20)], 50), abs=1e-9)


def test_federated_eval_needs_clients_with_test_data_and_vectorize_refuses_sequences():
    cfg = SimConfig(clients=10, clients_per_round=2, rounds=1, progress=False,
                    model=ModelConfig(name="logreg"), ray=RayConfig(workers=1),
                    federated_eval=FederatedEvalConfig(clients=5))
    with pytest.raises(ConfigError) as err:
        run_simulation(cfg)
    assert str(err.value).startswith("federated_eval.clients=5: allowed is 0 for data=digits")
    seq = SimConfig(clients=10, clients_per_round=2, rounds=1, progress=False,
                    ray=RayConfig(workers=1))
    seq.client.vectorize = 4
    with pytest.raises(ConfigError) as err:
        run_simulation(seq, data=custom_task.make_data(10), model=custom_task.build)
    assert str(err.value).startswith("client.vectorize=4: allowed is 0 or 1 for task next_token")
    with pytest.raises(ConfigError) as err:
        run_simulation(SimConfig(clients=10, clients_per_round=2, rounds=1, progress=False,
                                 model=ModelConfig(name="mlp")), data=custom_task.make_data(10))
    assert "model=keras with an embedding" in str(err.value)
    with pytest.raises(ConfigError, match="^federated_eval.clients=-1"):
        FederatedEvalConfig(clients=-1)


def test_a_resumed_run_keeps_only_the_client_rows_up_to_its_checkpoint(tmp_path):
    from fedsim.results.outputs import append_jsonl, keep_rounds

    path = tmp_path / "client_eval.jsonl"
    keep_rounds(path, 3)  # nothing to trim yet
    assert not path.exists()
    append_jsonl(path, [{"round": r, "client": c, "accuracy": 0.5} for r in (1, 2, 3, 4)
                        for c in (0, 1)])
    keep_rounds(path, 2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["round"], r["client"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    append_jsonl(path, [{"round": 3, "client": 0, "accuracy": float("nan")}])
    assert json.loads(path.read_text().splitlines()[-1])["accuracy"] is None


def test_leaf_synthetic_clients_are_evaluated_on_their_own_held_out_samples(warm_actors,
                                                                             tmp_path):
    """LEAF synthetic(1, 1) gives every client its own labelling model: each
    evaluated client's accuracy is recomputed with numpy from the final logreg
    weights on its own held-out 20% (``client_test``), and k SGD steps on the
    client's own training data (personalization) beat the global model there."""
    from fedsim.config import DataConfig
    from fedsim.data.loaders import SyntheticClientData

    cfg = SimConfig(clients=2000, clients_per_round=50, rounds=10, seed=0, progress=False,
                    data=DataConfig(name="synthetic"), model=ModelConfig(name="logreg"),
                    ray=RayConfig(workers=1), eval_every=10,
                    federated_eval=FederatedEvalConfig(clients=40, personalization_steps=10))
    res = run_simulation(cfg, tmp_path, actors=warm_actors)
    w = np.asarray(res.weights, np.float64)
    kernel, bias = w[:600].reshape(60, 10), w[600:]
    population = SyntheticClientData(num_clients=2000, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "client_eval.jsonl").read_text().splitlines()]
    fed = {r["client"]: r["accuracy"] for r in rows if r["kind"] == "fed"}
    pers = {r["client"]: r["accuracy"] for r in rows if r["kind"] == "pers"}
    assert len(fed) == 40 and sorted(pers) == sorted(fed)
    for cid, acc in fed.items():
        x, y = population.client_test(cid)
        assert acc == pytest.approx(np.mean(np.argmax(x @ kernel + bias, axis=1) == y),
                                    abs=1e-6)
    final = res.metrics[-1]
    assert final["fed_accuracy_mean"] == pytest.approx(np.mean(list(fed.values())), abs=1e-9)
    assert final["pers_accuracy_mean"] > final["fed_accuracy_mean"] + 0.1

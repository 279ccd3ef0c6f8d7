"""Vectorized multi-client training equals training the clients one at a time."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.client.local import LocalTrainer
from fedsim.client.vectorized import VectorizedTrainer, batch_plan
from fedsim.config import ClientConfig, ModelConfig
from fedsim.models.spec import model_spec

# Unequal clients: a partial last batch (23, 7, 12), fewer examples than a batch
# (3, 1), exactly two batches (10).
SIZES = (23, 3, 10, 7, 12, 1)
SHAPE = (8, 8, 1)
BATCH, EPOCHS = 5, 2


def _clients(seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((n, *SHAPE), dtype=np.float32),
             rng.integers(0, 10, size=n).astype(np.int32)) for n in SIZES]


def _pair(name, momentum, **kw):
    model_cfg = ModelConfig(name=name, hidden=[16], filters=[4, 8])
    client_cfg = ClientConfig(learning_rate=0.1, momentum=momentum)
    args = (model_spec(model_cfg), client_cfg, SHAPE, 10, BATCH, EPOCHS)
    return LocalTrainer(*args, seed=7), VectorizedTrainer(*args, seed=7, **kw)


def _global(trainer):
    rng = np.random.default_rng(5)
    w = trainer.flat.get().numpy()
    return w + rng.normal(scale=0.01, size=w.shape).astype(np.float32)


@pytest.mark.parametrize("dense", ["factored", "stacked"])
@pytest.mark.parametrize("name,momentum", [("logreg", 0.0), ("mlp", 0.0), ("mlp", 0.9),
                                           ("cnn", 0.0), ("cnn", 0.9)])
def test_vectorized_equals_one_client_at_a_time(name, momentum, dense):
    local, vec = _pair(name, momentum, max_clients_per_call=4, dense=dense)  # 2 calls
    assert vec.num_parameters == local.num_parameters
    w0 = _global(local)
    clients = _clients()
    expected = [local.train(w0, x, y, np.random.default_rng(100 + i))
                for i, (x, y) in enumerate(clients)]
    got = vec.train_many(w0, [(x, y, np.random.default_rng(100 + i))
                              for i, (x, y) in enumerate(clients)])
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.num_examples == e.num_examples
        assert np.linalg.norm(e.delta) > 1e-3  # training moved the weights
        np.testing.assert_allclose(g.delta, e.delta, rtol=1e-4, atol=1e-6)
        assert g.loss == pytest.approx(e.loss, rel=1e-5)
    # One compiled function for every chunk (K and step counts differ): no retracing.
    train = vec._train if dense == "factored" else vec._train_stacked
    assert train.experimental_get_tracing_count() == 1


def test_wrong_shuffling_or_data_gives_a_different_result():
    local, vec = _pair("mlp", 0.5, max_clients_per_call=8)
    w0 = _global(local)
    clients = _clients()
    expected = [local.train(w0, x, y, np.random.default_rng(100 + i))
                for i, (x, y) in enumerate(clients)]
    # Client 0's rng handed to client 4 and vice versa (both hold > 1 batch).
    seeds = [104, 101, 102, 103, 100, 105]
    swapped = vec.train_many(w0, [(x, y, np.random.default_rng(s))
                                  for (x, y), s in zip(clients, seeds)])
    assert not np.allclose(swapped[0].delta, expected[0].delta, rtol=1e-4, atol=1e-6)
    assert not np.allclose(swapped[4].delta, expected[4].delta, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(swapped[1].delta, expected[1].delta, rtol=1e-4, atol=1e-6)
    # Another client's labels: different update.
    x0, y0 = clients[0]
    other = vec.train(w0, x0, np.roll(y0, 1), np.random.default_rng(100))
    assert not np.allclose(other.delta, expected[0].delta, rtol=1e-4, atol=1e-6)


def test_result_does_not_depend_on_chunk_composition_and_repeats_exactly():
    _, vec = _pair("cnn", 0.9, max_clients_per_call=6)
    w0 = _global(vec)
    clients = _clients()
    together = vec.train_many(w0, [(x, y, np.random.default_rng(i))
                                   for i, (x, y) in enumerate(clients)])
    for i in (0, 5):
        alone = vec.train(w0, *clients[i], np.random.default_rng(i))
        np.testing.assert_allclose(alone.delta, together[i].delta, rtol=1e-5, atol=1e-7)
    # The same chunks again: bit for bit.
    again = vec.train_many(w0, [(x, y, np.random.default_rng(i))
                                for i, (x, y) in enumerate(clients)])
    for r, s in zip(together, again):
        np.testing.assert_array_equal(r.delta, s.delta)
        assert r.loss == s.loss


def test_vmap_conv_backend_equals_grouped():
    _, grouped = _pair("cnn", 0.0, max_clients_per_call=6)
    _, vmap = _pair("cnn", 0.0, max_clients_per_call=6, conv="vmap")
    w0 = _global(grouped)
    clients = _clients()[:3]
    a = grouped.train_many(w0, [(x, y, np.random.default_rng(i)) for i, (x, y) in
                                enumerate(clients)])
    b = vmap.train_many(w0, [(x, y, np.random.default_rng(i)) for i, (x, y) in
                             enumerate(clients)])
    for r, s in zip(a, b):
        np.testing.assert_allclose(r.delta, s.delta, rtol=1e-4, atol=1e-6)


def test_batch_plan_cuts_batches_like_local_training():
    order = [np.array([2, 0, 1, 1, 2, 0], np.int32), np.array([0, 0], np.int32)]
    idx, weights, active = batch_plan([3, 1], 2, 2, order, [10, 20])
    # Client 0: 2 steps per epoch (2 + 1 examples), 2 epochs.
    np.testing.assert_array_equal(idx[0], [[12, 10], [11, 0], [11, 12], [10, 0]])
    np.testing.assert_allclose(weights[0], [[0.5, 0.5], [1, 0], [0.5, 0.5], [1, 0]])
    np.testing.assert_array_equal(active, [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(idx[1, :2], [[20, 0], [20, 0]])
    np.testing.assert_allclose(weights[1], [[1, 0], [1, 0], [0, 0], [0, 0]])


def test_dp_sgd_clients_are_refused():
    with pytest.raises(NotImplementedError, match="sgd only"):
        VectorizedTrainer(model_spec(ModelConfig(name="logreg")), ClientConfig(optimizer="dp_sgd"),
                          SHAPE, 10, BATCH, EPOCHS)


def test_auto_dense_layout_factors_short_clients_and_trains_long_ones_one_at_a_time():
    local, vec = _pair("mlp", 0.5, max_clients_per_call=6)
    assert vec.dense == "auto" and vec.stack_long_clients  # 16 hidden units: small
    vec.stack_long_clients = False  # as for a model of large dense kernels
    w0 = _global(local)
    clients = _clients()
    expected = [local.train(w0, x, y, np.random.default_rng(i))
                for i, (x, y) in enumerate(clients)]
    # The longest client holds 23 examples: 5 steps per epoch x 2 epochs x batch 5.
    vec.factored_max_slots = 49
    alone = vec.train_many(w0, [(x, y, np.random.default_rng(i))
                                for i, (x, y) in enumerate(clients)])
    vec.factored_max_slots = 50
    factored = vec.train_many(w0, [(x, y, np.random.default_rng(i))
                                   for i, (x, y) in enumerate(clients)])
    assert vec._train.experimental_get_tracing_count() == 1
    assert vec._train_stacked.experimental_get_tracing_count() == 0
    for e, a, b in zip(expected, alone, factored):
        # One at a time is LocalTrainer's own graph on the same drawn order: equal.
        np.testing.assert_array_equal(a.delta, e.delta)
        assert a.loss == e.loss and a.num_examples == e.num_examples
        np.testing.assert_allclose(b.delta, e.delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_auto_dense_layout_stacks_long_clients_of_small_or_conv_models(name):
    local, vec = _pair(name, 0.5, max_clients_per_call=6)
    assert vec.stack_long_clients
    w0 = _global(local)
    clients = _clients()
    vec.factored_max_slots = 49
    stacked = vec.train_many(w0, [(x, y, np.random.default_rng(i))
                                  for i, (x, y) in enumerate(clients)])
    assert vec._train_stacked.experimental_get_tracing_count() == 1
    assert vec._train.experimental_get_tracing_count() == 0
    for i, ((x, y), got) in enumerate(zip(clients, stacked)):
        want = local.train(w0, x, y, np.random.default_rng(i))
        np.testing.assert_allclose(got.delta, want.delta, rtol=1e-4, atol=1e-6)


def test_factored_slot_limit_is_where_the_corrections_cost_what_formed_kernels_do():
    from fedsim.client.vectorized import FACTORED_MAX_SLOTS, factored_slot_limit

    # LEAF synthetic's 60 -> 1500 -> 10 MLP: (60*1500 + 1500*10) / (1560 + 1510).
    assert factored_slot_limit([(60, 1500), (1500, 10)]) == 105000 // 3070 == 34
    # compare_simulators' 784 -> 128 -> 10 MLP on clients of 50 examples: factored.
    assert factored_slot_limit([(784, 128), (128, 10)]) == 101632 // 1050 == 96
    assert factored_slot_limit([(4096, 4096)]) == FACTORED_MAX_SLOTS
    assert factored_slot_limit([]) == 0
    _, vec = _pair("mlp", 0.0)
    shapes = [tuple(v.shape) for v in vec.model.trainable_variables if len(v.shape) == 2]
    assert vec.factored_max_slots == factored_slot_limit(shapes) > 0


def test_large_dense_models_train_long_clients_one_at_a_time():
    from fedsim.client.vectorized import STACKED_MAX_KERNEL_FLOATS

    def vec(hidden, name="mlp"):
        return VectorizedTrainer(model_spec(ModelConfig(name=name, hidden=hidden,
                                                        filters=[4, 8])),
                                 ClientConfig(), SHAPE, 10, BATCH, EPOCHS)

    per_unit = SHAPE[0] * SHAPE[1] + 10  # 64 inputs -> h -> 10 classes
    fits = STACKED_MAX_KERNEL_FLOATS // per_unit
    assert vec([fits]).stack_long_clients
    assert not vec([fits + 1]).stack_long_clients
    assert vec([fits + 1], name="cnn").stack_long_clients  # convolutions: stacked


def test_vectorize_auto_picks_the_vectorized_trainer_only_where_it_applies():
    from fedsim.algorithms.base import resolve_algorithm
    from fedsim.config import AUTO_VECTORIZE, AlgorithmConfig, RayConfig, SimConfig
    from fedsim.errors import ConfigError
    from fedsim.models.spec import ModelSpec
    from fedsim.simulation import resolve_vectorize

    def resolved(custom=None, **kw):
        cfg = SimConfig(clients=10, clients_per_round=5, **kw)
        spec = model_spec(cfg.model, custom)
        algo = resolve_algorithm(cfg.algorithm, cfg)
        return resolve_vectorize(cfg, spec, algo).client.vectorize

    assert ClientConfig().vectorize == "auto"
    assert resolved() == AUTO_VECTORIZE
    assert resolved(model=ModelConfig(name="logreg")) == AUTO_VECTORIZE
    # The CNN gains only from several cores per worker.
    assert resolved(model=ModelConfig(name="cnn")) == 0
    assert resolved(model=ModelConfig(name="cnn"),
                    ray=RayConfig(cpus_per_worker=2)) == AUTO_VECTORIZE
    # Where the vectorized trainer does not apply, auto is one at a time, silently.
    assert resolved(client=ClientConfig(optimizer="dp_sgd")) == 0
    for name in ("fedprox", "scaffold", "mime_lite"):
        assert resolved(algorithm=AlgorithmConfig(name=name)) == 0
    custom = ModelSpec(lambda shape, classes, seed: None)  # never built here
    assert resolved(custom=custom) == 0
    # A number is kept; a bad value is one line naming the option.
    assert resolved(client=ClientConfig(vectorize=0)) == 0
    assert resolved(client=ClientConfig(vectorize="8")) == 8
    with pytest.raises(ConfigError, match="^client.vectorize=-1: allowed is auto or an integer"):
        ClientConfig(vectorize=-1)
    with pytest.raises(ConfigError, match="^client.vectorize=many: allowed is auto or"):
        ClientConfig(vectorize="many")

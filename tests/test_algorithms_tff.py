"""Oracles for fedsim's FedProx and Mime-Lite: two rounds through the real
engine classes (:class:`fedsim.engine.server.Server` and
:class:`fedsim.engine.worker.ClientWorker`, in-process) against TFF's learning
processes (``build_{weighted,unweighted}_fed_prox``,
``build_{weighted,unweighted}_mime_lite``) on the same clients, fed the same
batches in the same order.

The TFF clients' datasets are fedsim's order: per epoch e, the permutation
``epoch_order`` draws from the stream ``(seed, SHUFFLE, round, client)``,
batched, concatenated over the epochs. TFF iterates one dataset for both of
Mime-Lite's passes, so its full gradient runs over both epochs while fedsim's
runs over the first epoch only: the sum of ``|b| * grad(mean loss_b)`` over a
pass is the sum of the per-example gradients whatever the batching (the model
has no regularizers), so both are the same mean, up to float32 rounding, which
the tolerances cover. TFF's example weight counts the examples twice (2n);
normalised, it is fedsim's n.

TFF 0.87's FedProx adds its proximal term with the opposite sign to the paper's
(and fedsim's): see :func:`test_fedprox_equals_tffs_fed_prox_but_for_tffs_proximal_sign`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedsim.config import AlgorithmConfig, ClientConfig, ModelConfig, ServerConfig, SimConfig

SIZES = (7, 13, 30)  # clients of different sizes: weighted and uniform differ
DIM, CLASSES = 6, 3
ROUNDS, EPOCHS, BATCH = 2, 2, 4
LR, MU, MOMENTUM = 0.1, 0.5, 0.9
RTOL, ATOL = 1e-5, 1e-6


class _Clients:
    """Fixed clients (ClientData: ``num_clients`` and ``client(cid)``)."""

    def __init__(self, sizes=SIZES, seed=3) -> None:
        rng = np.random.default_rng(seed)
        self.data = []
        for n in sizes:
            x = rng.normal(size=(n, DIM)).astype(np.float32)
            y = rng.integers(0, CLASSES, n).astype(np.int32)
            self.data.append((x, y))

    @property
    def num_clients(self) -> int:
        return len(self.data)

    def client(self, cid):
        return self.data[cid]


def _cfg(algorithm: str, weighting: str, *, mu: float = 0.0, momentum: float = 0.0
         ) -> SimConfig:
    return SimConfig(clients=len(SIZES), clients_per_round=len(SIZES), rounds=ROUNDS,
                     local_epochs=EPOCHS, batch_size=BATCH, seed=11,
                     model=ModelConfig(name="logreg"), progress=False,
                     client=ClientConfig(learning_rate=LR, momentum=momentum),
                     server=ServerConfig(optimizer="sgd", learning_rate=1.0,
                                         weighting=weighting),
                     algorithm=AlgorithmConfig(name=algorithm, mu=mu))


def _fedsim_rounds(cfg: SimConfig, data: _Clients) -> tuple[np.ndarray, list[np.ndarray]]:
    """(initial global weights, the global weights after each round)."""
    from fedsim.engine.parts import resolve_parts
    from fedsim.engine.server import Server
    from fedsim.engine.worker import ClientWorker

    parts = resolve_parts(cfg)
    x0 = data.client(0)[0]
    server = Server(cfg, parts, x0.shape[1:], CLASSES, x0, data.client(0)[1])
    worker = ClientWorker(cfg, parts, data, x0.shape[1:], CLASSES)
    ids = list(range(data.num_clients))
    initial = server.weights.copy()
    out = []
    for rnd in range(1, cfg.rounds + 1):
        report = worker.train_round(rnd, server.global_weights(), server.client_params(), ids)
        server.apply(rnd, len(ids), report)
        out.append(server.weights.copy())
    return initial, out


def _tff_datasets(cfg: SimConfig, data: _Clients, rnd: int) -> list:
    """Each client's round-``rnd`` batches, in fedsim's order."""
    import tensorflow as tf

    from fedsim.client.local import epoch_order
    from fedsim.rng import STREAM_SHUFFLE, stream

    out = []
    for cid in range(data.num_clients):
        x, y = data.client(cid)
        n = len(x)
        order = epoch_order(n, cfg.local_epochs, stream(cfg.seed, STREAM_SHUFFLE, rnd, cid))
        ds = None
        for e in range(cfg.local_epochs):
            perm = order[e * n:(e + 1) * n]
            part = tf.data.Dataset.from_tensor_slices((x[perm], y[perm])).batch(cfg.batch_size)
            ds = part if ds is None else ds.concatenate(part)
        out.append(ds)
    return out


def _model_fn(cfg: SimConfig):
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedsim.models.spec import model_spec

    spec = model_spec(cfg.model)
    input_spec = (tf.TensorSpec([None, DIM], tf.float32), tf.TensorSpec([None], tf.int32))

    def model_fn():
        return tff.learning.models.from_keras_model(
            spec.build((DIM,), CLASSES, cfg.seed),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=input_spec)

    return model_fn, spec


def _tff_rounds(process, cfg: SimConfig, data: _Clients, initial: np.ndarray
                ) -> list[np.ndarray]:
    """TFF's global weights (flat, fedsim's order) after each round from ``initial``."""
    import tensorflow_federated as tff

    from fedsim.models.keras import FlatWeights

    model_fn, spec = _model_fn(cfg)
    keras_model = spec.build((DIM,), CLASSES, cfg.seed)
    flat = FlatWeights(keras_model.trainable_variables)
    flat.assign(initial)
    state = process.initialize()
    state = process.set_model_weights(state, tff.learning.models.ModelWeights(
        trainable=[v.numpy() for v in keras_model.trainable_variables], non_trainable=[]))
    out = []
    for rnd in range(1, cfg.rounds + 1):
        state = process.next(state, _tff_datasets(cfg, data, rnd)).state
        trainable = process.get_model_weights(state).trainable
        out.append(np.concatenate([np.asarray(t, np.float32).ravel() for t in trainable]))
    return out


def _compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    worst = 0.0
    for rnd, (a, b) in enumerate(zip(ours, theirs), 1):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"round {rnd}")
        worst = max(worst, float(np.max(np.abs(a - b))))
    print(f"max |fedsim - tff| = {worst:.3g}")
    return worst


@pytest.fixture(scope="module", autouse=True)
def _stop_worker_binaries():
    """Stop the TFF worker_binary processes this module's learning processes
    started (they outlive Python; others' are left alone)."""
    from fedsim.interop.tff import _worker_binaries, stop_tff_worker_binaries

    before = {p.pid for p in _worker_binaries()}
    yield
    stop_tff_worker_binaries(pids={p.pid for p in _worker_binaries()} - before)


@pytest.fixture(scope="module")
def data():
    return _Clients()


@pytest.fixture(scope="module")
def fedavg_rounds(data):
    """Plain FedAvg's rounds per weighting: the algorithms under test must differ."""
    return {w: _fedsim_rounds(_cfg("fedavg", w), data)[1] for w in ("num_examples", "uniform")}


def _differs(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert np.max(np.abs(a[-1] - b[-1])) > 1e-3


def _tff_fed_prox(cfg: SimConfig, weighting: str):
    import tensorflow_federated as tff

    model_fn, _ = _model_fn(cfg)
    sgd = tff.learning.optimizers.build_sgdm(learning_rate=LR)
    server = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    build = (tff.learning.algorithms.build_weighted_fed_prox if weighting == "num_examples"
             else tff.learning.algorithms.build_unweighted_fed_prox)
    return build(model_fn, proximal_strength=MU, client_optimizer_fn=sgd,
                 server_optimizer_fn=server)


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_fedprox_equals_tffs_fed_prox_but_for_tffs_proximal_sign(weighting, data, fedavg_rounds):
    """fedsim's FedProx rounds are TFF's once fedsim's proximal term takes TFF's
    sign. TFF 0.87's ``proximal_client_work`` adds ``delta_l2_regularizer *
    (y - x)`` over (model, initial) weights, ``mu * (w_global - w)``: the
    gradient of ``-mu/2 ||w - w_global||^2``, not of the paper's term; fedsim
    adds ``mu * (w - w_global)`` (Li et al.). The sign is patched into fedsim's
    trainer for the comparison (it traces its FedProx graph on first use, after
    the patch); with fedsim's own sign the rounds differ from TFF's, and its
    proximal term pulls the clients towards the global model: the first round
    moves less than FedAvg's."""
    cfg = _cfg("fedprox", weighting, mu=MU)
    initial, ours = _fedsim_rounds(cfg, data)
    theirs = _tff_rounds(_tff_fed_prox(cfg, weighting), cfg, data, initial)
    assert np.max(np.abs(ours[0] - theirs[0])) > 1e-2  # the sign matters
    _differs(ours, fedavg_rounds[weighting])
    fedavg = fedavg_rounds[weighting]
    assert np.linalg.norm(ours[0] - initial) < np.linalg.norm(fedavg[0] - initial)
    from fedsim.client.local import LocalTrainer

    with pytest.MonkeyPatch.context() as mp:
        real = LocalTrainer._train_graph

        def flipped(self, *args, mu=None, **kw):
            return real(self, *args, mu=None if mu is None else -mu, **kw)

        mp.setattr(LocalTrainer, "_train_graph", flipped)
        _, tff_signed = _fedsim_rounds(cfg, data)
    _compare(tff_signed, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_mime_lite_equals_tffs_mime_lite(weighting, data):
    import tensorflow_federated as tff

    cfg = _cfg("mime_lite", weighting, momentum=MOMENTUM)
    initial, ours = _fedsim_rounds(cfg, data)
    model_fn, _ = _model_fn(cfg)
    base = tff.learning.optimizers.build_sgdm(learning_rate=LR, momentum=MOMENTUM)
    server = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    build = (tff.learning.algorithms.build_weighted_mime_lite if weighting == "num_examples"
             else tff.learning.algorithms.build_unweighted_mime_lite)
    process = build(model_fn, base_optimizer=base, server_optimizer=server)
    _compare(ours, _tff_rounds(process, cfg, data, initial))
    # FedAvg with the same client momentum (each client's own, reset per round)
    fedavg = _fedsim_rounds(dataclasses.replace(cfg, algorithm=AlgorithmConfig()), data)[1]
    _differs(ours, fedavg)


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_mime_lite_without_momentum_and_fedprox_without_mu_are_fedavg(
        weighting, data, fedavg_rounds):
    """No TFF: with client momentum 0 Mime-Lite's base optimizer has no state,
    and FedProx with mu 0 has no proximal term; both are FedAvg bit for bit."""
    want = fedavg_rounds[weighting]
    for cfg in (_cfg("mime_lite", weighting), _cfg("fedprox", weighting, mu=0.0)):
        got = _fedsim_rounds(cfg, data)[1]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)

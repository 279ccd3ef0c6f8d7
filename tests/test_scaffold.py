"""SCAFFOLD (option II) and its on-disk client-state store.

- :class:`fedsim.client.state.ClientStateStore` on its own: sparse zeros, staged
  rows invisible until committed, failed attempts dropped, undo logs, pruning,
  shards.
- A hand-written numpy SCAFFOLD on softmax regression against fedsim's real
  engine classes (:class:`ClientWorker`, :class:`Server`, in-process, no Ray).
- pfl-research's update rule as published (apple/pfl-research,
  ``pfl/algorithm/scaffold.py``, option II) against ``Scaffold.client_update``
  and ``apply`` on random vectors.
- A run that dies after round 3 was committed to the store, with its checkpoint
  at round 2, resumes bit-identically to an uninterrupted run.
- Every refused composition says so in one line.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import logreg_local_sgd

from fedsim.config import (
    AggregatorConfig,
    AlgorithmConfig,
    AuditConfig,
    ClientConfig,
    DPConfig,
    ModelConfig,
    SecAggConfig,
    ServerConfig,
    SimConfig,
)
from fedsim.errors import ConfigError, FedsimError

# -- the store -------------------------------------------------------------------


def _store(root: Path, num_clients: int = 10, fields=None, shard_clients: int = 3):
    from fedsim.client.state import ClientStateStore

    return ClientStateStore.create(root, num_clients, fields or {"control": 5, "other": 2},
                                   shard_clients)


def _row(store, value: float) -> dict[str, np.ndarray]:
    return {name: np.full(size, value, np.float32) + np.arange(size, dtype=np.float32)
            for name, size in store.fields.items()}


def _assert_row(store, cid: int, want: dict[str, np.ndarray]) -> None:
    got = store.read(cid)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want[name])


def _zeros(store) -> dict[str, np.ndarray]:
    return {name: np.zeros(size, np.float32) for name, size in store.fields.items()}


def test_store_never_written_clients_are_zeros_and_take_no_disk(tmp_path):
    # rows of 1024 floats (4 KiB, one block each), 10,000 clients in shards of 4096
    store = _store(tmp_path / "s", 10_000, {"control": 1024}, 4096)
    assert store.bytes_on_disk() == 0
    _assert_row(store, 0, _zeros(store))
    _assert_row(store, 9_999, _zeros(store))
    path = store.stage(1, 0, 0, {5_000: _row(store, 1.0)})
    store.commit(1, [path])
    _assert_row(store, 5_000, _row(store, 1.0))
    # one shard file, 1,000 rows long, holding one row's blocks (not 4 MiB)
    (shard,) = (tmp_path / "s" / "shards").glob("*.f32")
    assert shard.stat().st_size == (5_000 - 4_096 + 1) * 4096
    assert 0 < store.bytes_on_disk() <= 4 * 4096
    # around it, and past the end of the shard file: zeros
    for cid in (0, 4_096, 4_999, 5_001, 8_191, 9_999):
        _assert_row(store, cid, _zeros(store))
    assert store.bytes_on_disk() <= 4 * 4096  # reading writes nothing
    store.close()


def test_store_staged_rows_are_invisible_until_committed(tmp_path):
    store = _store(tmp_path / "s")
    path = store.stage(1, 0, 0, {1: _row(store, 1.0), 4: _row(store, 4.0)})
    assert path is not None and Path(path).exists()
    assert store.stage(1, 1, 0, {}) is None  # nothing to stage
    _assert_row(store, 1, _zeros(store))
    _assert_row(store, 4, _zeros(store))
    # another process (a worker) opening the store sees the same
    from fedsim.client.state import ClientStateStore

    other = ClientStateStore(tmp_path / "s")
    _assert_row(other, 1, _zeros(store))
    assert store.commit(1, [path, None]) == 2
    _assert_row(store, 1, _row(store, 1.0))
    _assert_row(store, 4, _row(store, 4.0))
    _assert_row(other, 4, _row(store, 4.0))
    _assert_row(store, 0, _zeros(store))
    assert list((tmp_path / "s" / "staged").iterdir()) == []
    assert store.undo_rounds() == [1]
    with pytest.raises(ValueError, match="staged twice"):
        store.commit(2, [store.stage(2, 0, 0, {3: _row(store, 3.0)}),
                         store.stage(2, 1, 0, {3: _row(store, 3.5)})])
    _assert_row(store, 3, _zeros(store))
    store.close()
    other.close()


def test_store_failed_attempt_is_ignored_and_removed_by_commit(tmp_path):
    store = _store(tmp_path / "s")
    first = store.stage(2, 0, 0, {1: _row(store, -1.0), 2: _row(store, -2.0)})  # died after
    kept = store.stage(2, 1, 0, {7: _row(store, 7.0)})  # a worker that lived
    retry = store.stage(2, 0, 1, {1: _row(store, 1.0)})
    # round 12's staging survives the commits of rounds 1 and 2
    later = store.stage(12, 0, 0, {9: _row(store, 9.0)})
    assert first != retry and Path(first).exists()
    assert store.commit(2, [retry, kept]) == 2
    _assert_row(store, 1, _row(store, 1.0))
    _assert_row(store, 2, _zeros(store))  # only the failed attempt staged it
    _assert_row(store, 7, _row(store, 7.0))
    assert not Path(first).exists() and not Path(retry).exists() and not Path(kept).exists()
    assert Path(later).exists()
    store.commit(1, [])
    assert Path(later).exists()
    store.close()


def test_store_rollback_restores_each_earlier_round_exactly(tmp_path):
    store = _store(tmp_path / "s")
    rng = np.random.default_rng(0)
    cohorts = {1: [0, 3, 4], 2: [3, 5, 9], 3: [0, 1, 3], 4: [4, 5, 6, 9]}
    after: dict[int, dict[int, dict[str, np.ndarray]]] = {0: {c: _zeros(store)
                                                              for c in range(10)}}
    for rnd, ids in cohorts.items():
        rows = {c: {n: rng.normal(size=s).astype(np.float32) for n, s in store.fields.items()}
                for c in ids}
        half = len(ids) // 2  # two workers
        staged = [store.stage(rnd, 0, 0, {c: rows[c] for c in ids[:half]}),
                  store.stage(rnd, 1, 0, {c: rows[c] for c in ids[half:]})]
        store.commit(rnd, staged)
        after[rnd] = {**after[rnd - 1], **rows}
    for rnd in (4, 3, 2, 1):
        for c in range(10):
            _assert_row(store, c, after[rnd][c])
        assert store.rollback(rnd - 1) == 1
        assert store.undo_rounds() == list(range(1, rnd))
    for c in range(10):
        _assert_row(store, c, after[0][c])
    # several rounds at once, newest first; staged leftovers are dropped
    for rnd, ids in cohorts.items():
        store.commit(rnd, [store.stage(rnd, 0, 0, {c: after[rnd][c] for c in ids})])
    store.stage(5, 0, 0, {2: _row(store, 2.0)})
    assert store.rollback(1) == 3
    assert list((tmp_path / "s" / "staged").iterdir()) == []
    for c in range(10):
        _assert_row(store, c, after[1][c])
    store.close()


def test_store_prune_then_rollback_stops_at_the_pruned_round(tmp_path):
    store = _store(tmp_path / "s")
    for rnd in (1, 2, 3, 4):
        store.commit(rnd, [store.stage(rnd, 0, 0, {2: _row(store, rnd), rnd + 4: _row(store, rnd)})])
    store.prune(2)  # a checkpoint of round 2
    assert store.undo_rounds() == [3, 4]
    assert store.rollback(0) == 2  # asks for round 0; only back to round 2 is kept
    assert store.undo_rounds() == []
    _assert_row(store, 2, _row(store, 2.0))
    _assert_row(store, 5, _row(store, 1.0))
    _assert_row(store, 6, _row(store, 2.0))
    _assert_row(store, 7, _zeros(store))
    _assert_row(store, 8, _zeros(store))
    store.close()


def test_store_create_refuses_a_non_empty_directory_in_one_line(tmp_path):
    from fedsim.client.state import ClientStateStore

    _store(tmp_path / "s").close()
    with pytest.raises(FedsimError, match=r"^algorithm.state_dir=.*: allowed is a new or "
                                          r"empty directory") as err:
        _store(tmp_path / "s")
    assert "\n" not in str(err.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FedsimError, match=r"^algorithm.state_dir="):
        _store(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    _store(tmp_path / "empty").close()  # an empty directory is fine
    with pytest.raises(FedsimError, match=r"^algorithm.state_dir=.*: no client-state store"):
        ClientStateStore(tmp_path / "nothing")


def test_store_rows_cross_shard_boundaries(tmp_path):
    store = _store(tmp_path / "s", 10, shard_clients=3)  # shards 0-2, 3-5, 6-8, 9
    rows = {c: _row(store, 10.0 * c) for c in (2, 3, 5, 6, 9)}
    store.commit(1, [store.stage(1, 0, 0, rows)])
    for c in range(10):
        _assert_row(store, c, rows.get(c, _zeros(store)))
    names = sorted(p.name for p in (tmp_path / "s" / "shards").iterdir())
    assert names == [f"{f}-{k:06d}.f32" for f in ("control", "other") for k in range(4)]
    # client 5 is the last row of shard 1: its file holds 3 rows; client 9 the first of 3
    assert (tmp_path / "s" / "shards" / "control-000001.f32").stat().st_size == 3 * 5 * 4
    assert (tmp_path / "s" / "shards" / "other-000003.f32").stat().st_size == 1 * 2 * 4
    with pytest.raises(IndexError):
        store.read(10)
    with pytest.raises(ValueError, match="shape"):
        store.commit(2, [store.stage(2, 0, 0, {1: {"control": np.zeros(4), "other": np.zeros(2)}})])
    store.close()


# -- a hand-written SCAFFOLD on softmax regression, against the engine ------------


class _Clients:
    """A few clients of different sizes (the ClientData protocol)."""

    def __init__(self, sizes, input_shape, num_classes, seed=0):
        rng = np.random.default_rng(seed)
        self.parts = [(rng.normal(size=(n, *input_shape)).astype(np.float32),
                       rng.integers(0, num_classes, size=n).astype(np.int32)) for n in sizes]

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def client(self, cid: int):
        return self.parts[cid]


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_engine_equals_a_numpy_scaffold_on_softmax_regression(tmp_path, weighting):
    """Three rounds (all clients, a subset, all) of fedsim's ClientWorker and
    Server equal a direct numpy SCAFFOLD: the global weights, the server's c and
    every client's stored c_i. (``uniform`` is conf/algorithm/scaffold.yaml's and
    the paper's average; ``num_examples`` is what ``SimConfig(algorithm="scaffold")``
    gets from Python: the model update is then example-weighted, c's is not.)"""
    from fedsim.client.local import epoch_order
    from fedsim.client.state import ClientStateStore
    from fedsim.engine.parts import resolve_parts
    from fedsim.engine.server import Server
    from fedsim.engine.worker import ClientWorker
    from fedsim.rng import STREAM_SHUFFLE, stream

    sizes, input_shape, k = [7, 12, 3, 20, 9], (3, 2), 4
    lr, eta, batch, epochs = 0.2, 0.8, 4, 2
    state_dir = tmp_path / "state"
    cfg = SimConfig(clients=len(sizes), clients_per_round=len(sizes), rounds=3,
                    local_epochs=epochs, batch_size=batch, seed=5,
                    model=ModelConfig(name="logreg"),
                    client=ClientConfig(learning_rate=lr),
                    server=ServerConfig(learning_rate=eta, weighting=weighting),
                    algorithm=AlgorithmConfig(name="scaffold", state_dir=str(state_dir),
                                              state_shard_clients=2))
    data = _Clients(sizes, input_shape, k)
    parts = resolve_parts(cfg)
    x_test, y_test = data.client(0)
    server = Server(cfg, parts, input_shape, k, x_test, y_test)
    worker = ClientWorker(cfg, parts, data, input_shape, k)
    server.open_client_state(None)

    x = server.global_weights().astype(np.float64).copy()
    c = np.zeros_like(x)
    c_i = {i: np.zeros_like(x) for i in range(len(sizes))}
    for rnd, ids in ((1, [0, 1, 2, 3, 4]), (2, [1, 3, 4]), (3, [0, 1, 2, 3, 4])):
        params = server.client_params()
        report = worker.train_round(rnd, server.global_weights(), params, ids)
        server.apply(rnd, len(ids), report)
        deltas, change = [], np.zeros_like(x)
        for i in ids:
            xs, ys = data.client(i)
            order = epoch_order(len(xs), epochs, stream(cfg.seed, STREAM_SHUFFLE, rnd, i))
            delta = logreg_local_sgd(x, xs, ys, order, batch, epochs, lr, k,
                                         correction=c - c_i[i])
            steps = epochs * math.ceil(len(xs) / batch)
            new = c_i[i] - c + delta / (steps * lr)
            change += new - c_i[i]
            c_i[i] = new
            deltas.append(delta)
        weights = (np.ones(len(ids)) if weighting == "uniform"
                   else np.array([sizes[i] for i in ids], np.float64))
        x = x - eta * np.average(deltas, axis=0, weights=weights)
        c = c + change / len(sizes)

        np.testing.assert_allclose(server.global_weights(), x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(server.opt_state["control"], c, rtol=1e-5, atol=1e-6)
        store = ClientStateStore(state_dir)
        for i in range(len(sizes)):
            np.testing.assert_allclose(store.read(i)["control"], c_i[i], rtol=1e-5, atol=1e-6)
        store.close()
    assert np.abs(c).max() > 1e-3  # (the control variates are not trivially zero)
    # the worker's copy of the stored state is the committed one
    np.testing.assert_array_equal(worker._client_state(2)["control"],
                                  ClientStateStore(state_dir).read(2)["control"])
    worker.close()
    server.close()


# -- pfl-research's rule, as published ------------------------------------------


def _pfl_scaffold_round(server_c, local_cs, model_diffs, sizes, local_num_epochs,
                        local_batch_size, local_learning_rate, cohort_size, population):
    """apple/pfl-research ``pfl/algorithm/scaffold.py`` (option II,
    ``use_gradient_as_control_variate=False``), with numpy vectors for its
    ``MappedVectorStatistics``: ``train_one_user`` per user, then
    ``process_aggregated_statistics`` (the statistics summed with weight 1 per
    user, then ``average()``). Returns (new server_c, new local_cs, payloads,
    model_update)."""
    new_local, payloads = {}, {}
    for uid, local_c in local_cs.items():
        model_diff = model_diffs[uid]
        local_c_plus = local_c
        local_c_plus = local_c_plus + (-1 * server_c)
        data_size = sizes[uid]
        batch_size = data_size if local_batch_size is None else local_batch_size
        K = local_num_epochs * math.ceil(data_size / batch_size)  # noqa: N806 (pfl's name)
        local_c_plus = local_c_plus + model_diff / (K * local_learning_rate)
        new_local[uid] = local_c_plus  # storage.save_state(local_c_plus, ...)
        payloads[uid] = {"model_update": model_diff, "c": local_c_plus - local_c}
    weight = len(payloads)  # each user's statistics have weight 1
    summed = {key: sum(p[key] for p in payloads.values()) for key in ("model_update", "c")}
    averaged = {key: v / weight for key, v in summed.items()}
    server_c = server_c + averaged["c"] * cohort_size / population
    return server_c, new_local, payloads, averaged["model_update"]


def test_client_update_and_apply_follow_pfl_research_as_published():
    """On random vectors (no training: ``train`` returns a given delta), two
    rounds of Scaffold.client_update and apply against pfl-research's rule: the
    clients' new c_i, their payload c_i+ - c_i, the server's c and the model
    update (server sgd at 1.0: w - mean of the model diffs). fedsim divides the
    sum of the c changes by the population, i.e. pfl's mean times
    cohort_size / population with cohort_size the clients that reported (here
    all of the cohort)."""
    from fedsim.algorithms.base import add_sums
    from fedsim.algorithms.scaffold import CONTROL, CONTROL_DELTA, Scaffold
    from fedsim.client.local import ClientResult

    population, size, epochs, batch, lr = 11, 37, 3, 4, 0.05
    cfg = SimConfig(clients=population, clients_per_round=4, local_epochs=epochs,
                    batch_size=batch, algorithm="scaffold",
                    client=ClientConfig(learning_rate=lr),
                    server=ServerConfig(weighting="uniform"))
    algo = Scaffold(cfg)
    rng = np.random.default_rng(7)
    sizes = {uid: int(n) for uid, n in enumerate(rng.integers(1, 30, size=population))}
    weights = rng.normal(size=size).astype(np.float32)
    state = algo.initial_state(weights)
    local_c = {uid: np.zeros(size, np.float32) for uid in range(population)}  # never seen
    pfl_server_c = np.zeros(size, np.float64)
    pfl_local_c = {uid: np.zeros(size, np.float64) for uid in range(population)}
    pfl_weights = weights.astype(np.float64)
    for cohort in ([0, 3, 5, 8], [3, 4, 8, 10]):
        diffs = {uid: (rng.normal(size=size) * 0.1).astype(np.float32) for uid in cohort}
        payload = algo.client_payload(state)
        sums: dict = {}
        for uid in cohort:
            seen = {}

            def train(correction, _uid=uid, _seen=seen, _delta=diffs[uid]):
                _seen["correction"] = correction
                return ClientResult(delta=_delta, num_examples=sizes[_uid], loss=0.0)

            out = algo.client_update(train, payload, {CONTROL: local_c[uid]})
            # each step is corrected by c - c_i
            np.testing.assert_allclose(seen["correction"], state[CONTROL] - local_c[uid],
                                       rtol=1e-6, atol=1e-7)
            assert out.result.delta is diffs[uid]
            change, w = out.sums[CONTROL_DELTA]
            assert w == 1.0
            sums = add_sums(sums, out.sums)
            out_c = out.state[CONTROL]
            assert out_c.dtype == np.float32
            np.testing.assert_allclose(change, out_c.astype(np.float64) - local_c[uid],
                                       rtol=1e-6, atol=1e-7)
            local_c[uid] = out_c
        aggregate = np.mean([diffs[u] for u in cohort], axis=0).astype(np.float32)
        state, weights = algo.apply(state, weights, aggregate, sums)

        pfl_server_c, new_local, payloads, update = _pfl_scaffold_round(
            pfl_server_c, {u: pfl_local_c[u] for u in cohort},
            {u: diffs[u].astype(np.float64) for u in cohort}, sizes, epochs, batch, lr,
            cohort_size=len(cohort), population=population)
        pfl_local_c.update(new_local)
        pfl_weights = pfl_weights - update
        for uid in range(population):
            np.testing.assert_allclose(local_c[uid], pfl_local_c[uid], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sums[CONTROL_DELTA][0],
                                   sum(payloads[u]["c"] for u in cohort), rtol=1e-5, atol=1e-6)
        assert sums[CONTROL_DELTA][1] == len(cohort)
        np.testing.assert_allclose(state[CONTROL], pfl_server_c, rtol=1e-5, atol=1e-6)
        assert state[CONTROL].dtype == np.float32
        np.testing.assert_allclose(weights, pfl_weights, rtol=1e-5, atol=1e-6)
    assert np.abs(pfl_server_c).max() > 0.1


def test_non_finite_update_keeps_the_client_state_and_adds_nothing():
    from fedsim.algorithms.scaffold import CONTROL, Scaffold
    from fedsim.client.local import ClientResult

    algo = Scaffold(SimConfig(algorithm="scaffold"))
    delta = np.array([1.0, np.nan, 0.0], np.float32)
    out = algo.client_update(lambda correction: ClientResult(delta, 5, 0.0),
                             {CONTROL: np.ones(3, np.float32)},
                             {CONTROL: np.zeros(3, np.float32)})
    assert out.sums == {} and out.state is None


# -- resume after a crash with the store ahead of the checkpoint ------------------


def _store_rows(run_dir: Path, clients: int) -> np.ndarray:
    from fedsim.client.state import ClientStateStore

    store = ClientStateStore(run_dir / "client_state")
    try:
        return np.stack([store.read(c)["control"] for c in range(clients)])
    finally:
        store.close()


def test_resume_with_the_store_ahead_of_its_checkpoint_is_bit_identical(warm_actors, tmp_path,
                                                                        monkeypatch):
    """The run dies after round 3 was applied and its client states committed,
    with the checkpoint at round 2; resuming rolls the store back to round 2 and
    the finished run equals an uninterrupted one exactly: weights, server c,
    every client's c_i and the metrics. (Its run directory is given relative to
    a working directory the actors do not share: the store is in it all the same.)"""
    from helpers import DiesAfterRound, small_config, without_timings

    from fedsim.client.state import ClientStateStore
    from fedsim.results.checkpoint import load_checkpoint
    from fedsim.simulation import run_simulation

    cfg = small_config(clients=24, clients_per_round=4, rounds=4, checkpoint_every=2,
                       algorithm="scaffold", server=ServerConfig(weighting="uniform"))
    monkeypatch.chdir(tmp_path)  # (the actors' working directory stays where Ray started)
    crashed = Path("crashed")
    died = run_simulation(cfg, crashed, callbacks=[DiesAfterRound(3)], actors=warm_actors)
    assert died.summary["stop_reason"] == "died"
    assert load_checkpoint(crashed)["round"] == 2
    assert (tmp_path / "crashed" / "client_state" / "meta.json").exists()
    store = ClientStateStore(crashed / "client_state")
    assert store.undo_rounds() == [3]  # rounds 1, 2 pruned by the checkpoint; 3 committed
    store.close()
    ahead = _store_rows(crashed, cfg.clients)

    resumed = run_simulation(dataclasses.replace(cfg, resume=str(crashed)), actors=warm_actors)
    reference = run_simulation(cfg, tmp_path / "reference", actors=warm_actors)

    assert [r["round"] for r in resumed.metrics] == [1, 2, 3, 4]
    assert resumed.summary["resumed_from_round"] == 2
    assert without_timings(resumed.metrics) == without_timings(reference.metrics)
    np.testing.assert_array_equal(resumed.weights, reference.weights)
    final, want = load_checkpoint(crashed), load_checkpoint(tmp_path / "reference")
    assert final["round"] == want["round"] == 4
    np.testing.assert_array_equal(final["server"]["opt_state"]["control"],
                                  want["server"]["opt_state"]["control"])
    rows = _store_rows(crashed, cfg.clients)
    np.testing.assert_array_equal(rows, _store_rows(tmp_path / "reference", cfg.clients))
    assert not np.array_equal(rows, ahead)  # (round 3 was trained again, and 4)
    assert np.count_nonzero(np.abs(rows).sum(axis=1)) > cfg.clients_per_round
    assert reference.summary["memory_mib"]["client_state_disk_mib"] > 0


# -- refusals --------------------------------------------------------------------

_UNIFORM = ServerConfig(weighting="uniform")  # (DP asks for it before scaffold is checked)


@pytest.mark.parametrize("name", ["scaffold", "mime_lite"])
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(dp=DPConfig(mechanism="gaussian"), server=_UNIFORM),
     r"^dp.mechanism=gaussian: allowed is none with algorithm.name={name} "),
    (dict(secagg=SecAggConfig(protocol="secagg")),
     r"^secagg.protocol=secagg: allowed is none with algorithm.name={name} "),
    (dict(client=ClientConfig(optimizer="dp_sgd")),
     r"^client.optimizer=dp_sgd: allowed is sgd with algorithm.name={name} "),
    (dict(client=ClientConfig(vectorize=4)),
     r"^client.vectorize=4: allowed is 0 or 1 with algorithm.name={name} "),
    (dict(aggregator=AggregatorConfig(kind="tff", factory="x:y")),
     r"^aggregator.kind=tff: allowed is native with algorithm.name={name} "),
    (dict(aggregator=AggregatorConfig(kind="median"), server=_UNIFORM),
     r"^aggregator.kind=median: allowed is native with algorithm.name={name} "),
    (dict(audit=AuditConfig(kind="canary")),
     r"^audit.kind=canary: allowed is none with algorithm.name={name} "),
])
def test_refused_compositions_say_so_in_one_line(name, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern.format(name=name)) as err:
        SimConfig(algorithm=name, **kwargs)
    assert "\n" not in str(err.value)


def test_scaffold_refuses_client_momentum_in_one_line():
    with pytest.raises(ConfigError, match=r"^client.momentum=0.9: allowed is 0 with "
                                          r"algorithm.name=scaffold \(") as err:
        SimConfig(algorithm="scaffold", client=ClientConfig(momentum=0.9))
    assert "\n" not in str(err.value)
    SimConfig(algorithm="mime_lite", client=ClientConfig(momentum=0.9))  # Mime's own

"""Secure aggregation inside whole simulations on a real local Ray."""

from __future__ import annotations

import numpy as np

from fedsim.config import (
    DPConfig,
    FaultsConfig,
    ModelConfig,
    RayConfig,
    SecAggConfig,
    ServerConfig,
    SimConfig,
)
from fedsim.engine.parts import resolve_parts
from fedsim.secure.fixedpoint import FixedPointCodec
from fedsim.simulation import run_simulation


def _cfg(**kw) -> SimConfig:
    base = dict(clients=20, clients_per_round=6, rounds=1, local_epochs=1, batch_size=10,
                model=ModelConfig(name="logreg"), ray=RayConfig(workers=2), progress=False,
                server=ServerConfig(weighting="uniform"))
    base.update(kw)
    return SimConfig(**base)


def test_secure_training_matches_plain_within_the_quantization_bound(warm_actors):
    """SecAgg+ with a real Harary graph (20 clients per round, k = 10), clients
    dropping before upload (their masks are recovered): the model is the plain
    run's within the fixed-point bound. Skipping the masks that cancel in a
    worker's sum (the default, with ring placement) or having every client
    mask in full gives the same messages (test below)."""
    n0 = 20
    kw = dict(clients=40, clients_per_round=n0,
              dp=DPConfig(mechanism="gaussian", noise_multiplier=0.0, l2_norm_clip=0.5),
              faults=FaultsConfig(client_dropout=0.2))
    plain = run_simulation(_cfg(**kw, ray=RayConfig(workers=1)),  # (one TF start-up fewer)
                           actors=warm_actors)
    # Full SecAgg runs in the simulation in the dropout test below, and both
    # protocols sum bit-exactly in tests/test_secagg.py.
    secure = run_simulation(_cfg(**kw, secagg=SecAggConfig(protocol="secagg_plus")),
                            actors=warm_actors)
    row = secure.metrics[0]
    n = row["clients"]
    assert row["secagg"] == "ok" and row["dropped"] > 0 and n == n0 - row["dropped"]
    assert row["secagg_neighbours"] == 10
    assert plain.metrics[0]["clients"] == n
    # The decoded sum errs by < n / scale per coordinate; the mean divides by n0.
    bound = FixedPointCodec.for_sum(0.5, n0, bits=row["secagg_bits"]).error_bound(n) / n0
    diff = np.abs(secure.weights - plain.weights)
    assert diff.max() <= bound
    assert diff.max() > 0  # it really went through fixed point
    assert abs(row["eval_loss"] - plain.metrics[0]["eval_loss"]) < 1e-3


def test_a_worker_sends_the_same_masked_sum_whether_it_skips_cancelling_masks():
    """In process (the actors' classes, no Ray): one SecAgg+ round of 20
    clients (k = 10) on two ring shards, one client of the first shard
    dropping before masking. The first worker's MaskedSum, which is all the
    server receives from it, is the same bit for bit whether it skips the
    masks that cancel inside it or every client masks in full."""
    from fedsim.data.loaders import load_federated_data
    from fedsim.engine.server import Server
    from fedsim.engine.worker import ClientWorker
    from fedsim.secure.protocol import SecAggServer

    sent = []
    for skip in (True, False):
        cfg = _cfg(clients=40, clients_per_round=20,
                   dp=DPConfig(mechanism="gaussian", noise_multiplier=0.0, l2_norm_clip=0.5),
                   secagg=SecAggConfig(protocol="secagg_plus", skip_cancelling_masks=skip))
        data = load_federated_data(cfg.data, cfg.clients, cfg.seed)
        server = Server(cfg, resolve_parts(cfg), data.input_shape, data.num_classes,
                        data.x_test, data.y_test)
        workers = [ClientWorker(cfg, resolve_parts(cfg), data.train, data.input_shape,
                              data.num_classes, index=i)
                   for i in range(2)]
        layout, placed = server.secagg_begin(1, list(range(0, 40, 2)), 2)
        shards = sent[0][1] if sent else placed  # the same shards (the ring's) both times
        sa = server._secure.protocol  # the round's protocol server, to drive the rounds by hand
        assert isinstance(sa, SecAggServer) and sorted(map(len, shards)) == [10, 10]
        setups = sa.receive_keys([m for w, s in zip(workers, shards)
                                  for m in w.secagg_advertise(1, s)])
        deliveries = sa.route_shares([m for w, s in zip(workers, shards)
                                      for m in w.secagg_share_keys({c: setups[c] for c in s})])
        assert sa.neighbourhood_size == 10
        first = shards[0]
        workers[0].train_round(1, server.global_weights(), server.client_params(), first[1:],
                               layout)
        report = workers[0].secagg_mask({c: deliveries[c] for c in first})
        sent.append((report.masked[0], shards))
    (fast, _), (full, _) = sent
    assert fast.senders == full.senders == frozenset(first[1:])
    np.testing.assert_array_equal(fast.y, full.y)


def test_dropouts_recovered_or_round_aborted_without_touching_model_or_budget(warm_actors):
    res = run_simulation(_cfg(rounds=8, dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0),
                              secagg=SecAggConfig(protocol="secagg", dropout=0.35)),
                         actors=warm_actors)
    rows = res.metrics
    recovered = [r for r in rows if r["secagg"] == "ok" and r["secagg_dropped"] > 0]
    aborted = [r for r in rows if r["secagg"] == "aborted"]
    assert recovered and aborted, [(r["secagg"], r["secagg_dropped"]) for r in rows]
    t = 6 // 2 + 1
    for r in recovered:
        assert r["secagg_dropped"] <= 6 - t
    for r in aborted:
        assert r["secagg_dropped"] > 6 - t
        assert "secure aggregation aborted" in r["secagg_error"]
        prev = rows[r["round"] - 2] if r["round"] > 1 else None
        if prev is not None:
            assert r["epsilon"] == prev["epsilon"]  # no release, no privacy spent
            assert r["eval_loss"] == prev["eval_loss"]  # the model did not move
    assert rows[-1]["round"] == 8  # training went on after the aborts
    assert all(r["secagg_seconds"] > 0 for r in rows)  # aborted rounds' protocol time too
    assert res.summary["privacy"]["rounds_accounted"] == 8 - len(aborted)


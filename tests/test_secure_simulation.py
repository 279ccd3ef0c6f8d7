"""Secure aggregation inside whole simulations on a real local Ray."""

from __future__ import annotations

import numpy as np

from fedsim.config import DPConfig, FaultsConfig, ModelConfig, RayConfig, SecAggConfig, ServerConfig, SimConfig
from fedsim.fixedpoint import FixedPointCodec
from fedsim.simulation import run_simulation


def _cfg(**kw) -> SimConfig:
    base = dict(clients=20, clients_per_round=6, rounds=1, local_epochs=1, batch_size=10,
                model=ModelConfig(name="logreg"), ray=RayConfig(workers=2), progress=False,
                server=ServerConfig(weighting="uniform"))
    base.update(kw)
    return SimConfig(**base)


def test_secure_training_matches_plain_within_the_quantization_bound(ray_local):
    """SecAgg+ with a real Harary graph (20 clients per round, k = 10), clients
    dropping before upload (their masks are recovered): the model is the plain
    run's within the fixed-point bound. Skipping the masks that cancel in a
    worker's sum (the default, with ring placement) or having every client
    mask in full gives the same model bit for bit: the server sees the same."""
    n0 = 20
    kw = dict(clients=40, clients_per_round=n0,
              dp=DPConfig(mechanism="gaussian", noise_multiplier=0.0, l2_norm_clip=0.5),
              faults=FaultsConfig(client_dropout=0.2))
    plain = run_simulation(_cfg(**kw))
    # Full SecAgg runs in the simulation in the dropout test below, and both
    # protocols sum bit-exactly in tests/test_secagg.py.
    secure, full = [run_simulation(_cfg(**kw, secagg=SecAggConfig(
        protocol="secagg_plus", skip_cancelling_masks=skip))) for skip in (True, False)]
    row = secure.metrics[0]
    n = row["clients"]
    assert row["secagg"] == "ok" and row["dropped"] > 0 and n == n0 - row["dropped"]
    assert row["secagg_neighbours"] == full.metrics[0]["secagg_neighbours"] == 10
    assert plain.metrics[0]["clients"] == full.metrics[0]["clients"] == n
    # The decoded sum errs by < n / scale per coordinate; the mean divides by n0.
    bound = FixedPointCodec.for_sum(0.5, n0, bits=row["secagg_bits"]).error_bound(n) / n0
    diff = np.abs(secure.weights - plain.weights)
    assert diff.max() <= bound
    assert diff.max() > 0  # it really went through fixed point
    assert abs(row["eval_loss"] - plain.metrics[0]["eval_loss"]) < 1e-3
    np.testing.assert_array_equal(secure.weights, full.weights)


def test_dropouts_recovered_or_round_aborted_without_touching_model_or_budget(ray_local):
    res = run_simulation(_cfg(rounds=8, dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0),
                              secagg=SecAggConfig(protocol="secagg", dropout=0.35)))
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
    assert res.summary["privacy"]["rounds_accounted"] == 8 - len(aborted)


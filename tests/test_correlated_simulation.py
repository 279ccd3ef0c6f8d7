"""Correlated-noise mechanisms in whole simulations on a real local Ray: each runs
under SecAgg+ (the server adds its correlated noise to the unmasked sum) and
gives the plain run's model within the fixed-point error, and the run's epsilon
is a direct dp-accounting computation of the run's event."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedsim.config import (
    DataConfig,
    DPConfig,
    ModelConfig,
    RayConfig,
    SamplingConfig,
    SecAggConfig,
    ServerConfig,
    SimConfig,
)
from fedsim.privacy.accounting import rounded_sensitivity_factors
from fedsim.secure.fixedpoint import FixedPointCodec
from fedsim.simulation import run_simulation

MECHANISMS = {
    "tree_aggregation": dict(restart_every=3),
    "tree_adaptive": dict(restart_every=3, clipped_count_stddev=1.0),
    "banded_mf": dict(bands=3),
    "blt": dict(buffers=2),
}


def _cfg(mechanism: str, tmp_path, **kw) -> SimConfig:
    base = dict(clients=24, clients_per_round=8, rounds=4, local_epochs=1, batch_size=10,
                sampling=SamplingConfig(scheme="min_sep", min_sep=3),
                data=DataConfig(name="synthetic", synthetic_iid=True),
                model=ModelConfig(name="logreg"), ray=RayConfig(workers=2), progress=False,
                server=ServerConfig(weighting="uniform"), checkpoint_every=0,
                dp=DPConfig(mechanism=mechanism, noise_multiplier=0.8, l2_norm_clip=0.5,
                            strategy_cache=str(tmp_path), **MECHANISMS[mechanism]))
    base.update(kw)
    return SimConfig(**base)


@pytest.mark.parametrize("mechanism", sorted(MECHANISMS))
def test_correlated_mechanism_under_secagg_plus_matches_plain_run(mechanism, warm_actors,
                                                                  tmp_path):
    plain = run_simulation(_cfg(mechanism, tmp_path), actors=warm_actors)
    secure = run_simulation(_cfg(mechanism, tmp_path,
                                 secagg=SecAggConfig(protocol="secagg_plus")),
                            actors=warm_actors)
    assert all(m["secagg"] == "ok" for m in secure.metrics)
    # The same noise (the round's stream), the sums through fixed point: the
    # models differ by the rounding of 4 rounds' sums, no more.
    n = 8
    bound = FixedPointCodec.for_sum(0.5, n, bits=secure.metrics[0]["secagg_bits"]
                                    ).error_bound(n) / n
    diff = np.abs(secure.weights - plain.weights)
    assert 0 < diff.max() <= 50 * bound
    assert plain.metrics[-1]["noise_std"] > 0

    # epsilon: the run's event composed directly; under SecAgg+ charged for rounding
    for result, secured in ((plain, False), (secure, True)):
        privacy = result.summary["privacy"]
        z = 0.8
        if secured:
            z /= rounded_sensitivity_factors(result.weights.size, 16)[0]
        orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)
        delta = privacy["delta"]
        if mechanism.startswith("tree"):
            # 4 rounds, trees of 3: a client in 2 trees, each of depth ceil(log2(4)) = 2
            rdp = 2 * orders * 2 / (2 * z ** 2)
        else:
            from fedsim.privacy import matrix_factorization as mf
            from fedsim.privacy.mechanisms.base import resolve_mechanism

            s = resolve_mechanism(mechanism).strategy(_cfg(mechanism, tmp_path))
            sens_r = mf.toeplitz_sensitivity(s.coeffs[:4], mf.Participation("min_sep", 4,
                                                                               min_sep=3))
            rdp = orders / (2 * (z * s.sensitivity / sens_r) ** 2)
        direct = float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])
        assert privacy["epsilon"] == pytest.approx(direct, rel=1e-5)
        assert privacy["neighboring_relation"] == "REPLACE_SPECIAL"
        assert math.isfinite(privacy["epsilon"])


@pytest.mark.parametrize("mechanism", ["tree_adaptive", "blt"])
def test_resume_mid_tree_and_mid_buffers_is_bit_identical(mechanism, warm_actors, tmp_path):
    """The run dies after round 3 with its checkpoint at round 2 (mid-tree, the
    BLT buffers full of past noise); resumed, it equals an uninterrupted run:
    weights, metrics and epsilon."""
    import dataclasses

    from helpers import DiesAfterRound, without_timings

    cfg = _cfg(mechanism, tmp_path / "cache", rounds=5, checkpoint_every=2,
               dp=dataclasses.replace(_cfg(mechanism, tmp_path / "cache").dp, restart_every=3)
               if mechanism.startswith("tree") else _cfg(mechanism, tmp_path / "cache").dp)
    died = run_simulation(cfg, tmp_path / "crashed", callbacks=[DiesAfterRound(3)],
                          actors=warm_actors)
    assert died.summary["stop_reason"] == "died"
    if mechanism == "blt":  # its noise is planned for exactly 5 rounds
        from fedsim.results.checkpoint import CheckpointError

        with pytest.raises(CheckpointError, match="resume: rounds=6 differs"):
            run_simulation(dataclasses.replace(cfg, rounds=6, resume=str(tmp_path / "crashed")),
                           actors=warm_actors)
    resumed = run_simulation(dataclasses.replace(cfg, resume=str(tmp_path / "crashed")),
                             actors=warm_actors)
    reference = run_simulation(cfg, tmp_path / "reference", actors=warm_actors)
    assert resumed.summary["resumed_from_round"] == 2
    assert without_timings(resumed.metrics) == without_timings(reference.metrics)
    np.testing.assert_array_equal(resumed.weights, reference.weights)
    assert resumed.summary["privacy"]["epsilon"] == reference.summary["privacy"]["epsilon"]

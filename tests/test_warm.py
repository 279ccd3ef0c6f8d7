"""Warm actors (fedsim.engine.warm): server and worker actors reused across runs
compute what fresh ones compute, bit for bit, and faults do not carry over."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import small_config, without_timings

from fedsim.config import (
    AggregatorConfig,
    ClientConfig,
    DPConfig,
    ModelConfig,
    RayConfig,
    ServerConfig,
)
from fedsim.simulation import run_simulation


def test_reset_actors_compute_what_fresh_actors_compute(warm_actors):
    target = small_config(seed=7)
    # The fresh run needs the CPUs that the warm pool reserves.
    warm_actors.close()
    fresh = run_simulation(target)
    # Warm actors that first ran something else (another model, DP, vectorized clients).
    run_simulation(small_config(rounds=2, model=ModelConfig(name="mlp", hidden=[8]),
                                client=ClientConfig(vectorize=2),
                                dp=DPConfig(mechanism="gaussian_adaptive", noise_multiplier=0.5,
                                            clipped_count_stddev=1.0),
                                server=ServerConfig(weighting="uniform")), actors=warm_actors)
    used = warm_actors.handles()
    assert len(used) == 2  # the server and one worker
    warm = run_simulation(target, actors=warm_actors)
    assert warm_actors.handles() == used  # the same processes, reset
    assert without_timings(warm.metrics) == without_timings(fresh.metrics)
    assert (warm.weights == fresh.weights).all()
    assert warm.summary["num_parameters"] == fresh.summary["num_parameters"]


def test_a_server_that_fails_is_dropped_and_the_next_run_is_unaffected(warm_actors):
    reference = run_simulation(small_config(seed=3), actors=warm_actors)
    before = warm_actors.handles()
    # The server builds the TFF aggregator when it is (re)initialised: this one fails there.
    bad = small_config(aggregator=AggregatorConfig(kind="tff",
                                                   factory="fedsim.errors:FedsimError"))
    with pytest.raises(Exception, match="returned a fedsim.errors"):
        run_simulation(bad, actors=warm_actors)
    assert len(warm_actors) == 0  # nothing of the failed run is kept
    again = run_simulation(small_config(seed=3), actors=warm_actors)
    assert not set(warm_actors.handles()) & set(before)  # new actors
    assert without_timings(again.metrics) == without_timings(reference.metrics)
    assert (again.weights == reference.weights).all()


def test_fewer_workers_take_a_prefix_of_the_cached_pool(warm_actors):
    two = run_simulation(small_config(ray=RayConfig(workers=2)), actors=warm_actors)
    pool = warm_actors.handles()
    assert len(pool) == 3 and two.summary["workers"] == 2
    one = run_simulation(small_config(), actors=warm_actors)
    assert one.summary["workers"] == 1
    assert warm_actors.handles() == pool  # no actor started or stopped
    # Sharding differs, the clients' updates do not: the same model up to float sums.
    assert [r["clients"] for r in one.metrics] == [r["clients"] for r in two.metrics]
    np.testing.assert_allclose(one.weights, two.weights, rtol=0, atol=1e-5)

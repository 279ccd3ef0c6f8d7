"""Privacy noise samplers: true tails, the documented distributions, and the
server's noise drawn from them (pure numpy and TensorFlow, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedsim.config import DPConfig
from fedsim.engine.parts import resolve_parts
from fedsim.privacy import noise
from fedsim.privacy.queries import DPQueryAggregator

M64 = 2**64
TF_FLOAT32_CUTOFF = math.sqrt(-2 * math.log(1e-7))  # 5.678: Box-Muller's clamp in TF


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) % M64


def sfc64_emitting(o1: int, o2: int, b: int) -> tuple[np.random.SFC64, int]:
    """An SFC64 bit generator whose first two 64-bit outputs are o1 and o2, and
    its third output. SFC64: out = a + b + w; a <- b ^ (b >> 11); b <- 9c;
    c <- rotl(c, 24) + out; w <- w + 1. With w0 = 0 and a free b0 = ``b``:
    a0 = o1 - b0 and 9 c0 = o2 - 1 - (b0 ^ (b0 >> 11))."""
    a = (o1 - b) % M64
    c = (o2 - 1 - (b ^ (b >> 11))) * pow(9, -1, M64) % M64
    b1, c1 = 9 * c % M64, (_rotl(c, 24) + o1) % M64
    o3 = (b1 ^ (b1 >> 11)) + 9 * c1 + 2
    bg = np.random.SFC64()
    st = bg.state
    st["state"]["state"] = np.array([a, b, c, 0], dtype=np.uint64)
    bg.state = st
    return bg, o3 % M64


def test_the_gaussian_sampler_reaches_beyond_tensorflows_cutoff():
    """Fed extreme random bits, the sampler returns a value past 5.678 sigma, the
    largest TensorFlow's float32 Box-Muller can ever return (whatever its input).

    numpy's ziggurat takes its tail branch for layer 0 with a large mantissa
    (first word: low byte 0, then the sign bit, then 52 one bits); the tail then
    draws xx = -log(1 - U1) / r (r = 3.654), accepts when -2 log(1 - U2) > xx^2
    and returns r + xx, signed by bit 8 of the mantissa (here: negative).
    U1 = 1 - 2^-14 gives about 6.3 sigma."""
    o1 = (2**52 - 1) << 9  # layer 0, positive, largest mantissa
    u1_word = ((2**53 - 2**39) << 11)  # next_double = 1 - 2^-14
    r = 3.6541528853610088
    xx = math.log(2**14) / r
    for b in range(1, 2000):  # vary the free state word until U2 (the 3rd word) accepts
        bg, o3 = sfc64_emitting(o1, u1_word, b * 0x9E3779B97F4A7C15 % M64)
        u2 = (o3 >> 11) / 2**53
        if -2 * math.log1p(-u2) > xx * xx:
            break
    else:
        pytest.fail("no accepting third word found")
    value = float(noise.gaussian(np.random.Generator(bg), 1, 1.0)[0])
    assert abs(value) > TF_FLOAT32_CUTOFF + 0.5
    assert value == pytest.approx(-(r + xx), rel=1e-6)


def test_gaussian_and_laplace_moments_ks_and_tail_frequency():
    rng = np.random.default_rng(11)
    n = 2_000_000
    g = noise.gaussian(rng, n, 2.5) / 2.5
    assert g.dtype == np.float64
    assert abs(g.mean()) < 5 / math.sqrt(n)
    assert abs(g.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(g[:200_000], "norm").pvalue > 1e-4
    # the tail beyond 4 sigma holds its expected mass (binomial, 5 sigma)
    p = 2 * stats.norm.sf(4.0)
    k = int((np.abs(g) > 4.0).sum())
    assert abs(k - n * p) < 5 * math.sqrt(n * p)
    lap = noise.laplace(rng, n, 0.7)
    assert abs(np.abs(lap).mean() - 0.7) < 5 * 0.7 / math.sqrt(n)
    assert stats.kstest(lap[:200_000], "laplace", args=(0, 0.7)).pvalue > 1e-4
    assert not noise.laplace(rng, 5, 0.0).any()
    with pytest.raises(ValueError):
        noise.gaussian(rng, 3, -1.0)


@pytest.mark.parametrize("mechanism", ["gaussian", "gaussian_adaptive", "laplace"])
def test_server_noise_is_the_numpy_float64_stream(mechanism):
    """The aggregator's noise is exactly fedsim.privacy.noise's draws from the round's
    stream, added to the float64 sum (TF's float32 RNG is not used)."""
    d, cpr, seed = 1000, 4, 5
    dp = DPConfig(mechanism=mechanism, noise_multiplier=0.8, l2_norm_clip=1.5,
                  initial_l2_norm_clip=1.5, clipped_count_stddev=1.0, sensitivity=1.5,
                  epsilon=2.0)
    agg = DPQueryAggregator(dp, cpr)
    state = agg.initial_state()
    params = agg.client_params(state)
    update = np.linspace(-0.01, 0.01, d).astype(np.float32)
    partial = agg.accumulate(params, agg.zero_partial(d), update, 1)
    result, _, m = agg.finalize(state, partial, 1, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    if mechanism == "laplace":
        drawn = noise.laplace(rng, d, dp.sensitivity / dp.epsilon)
    else:
        from fedsim.privacy.queries import adaptive_clip_noise_params

        z = dp.noise_multiplier if mechanism == "gaussian" else adaptive_clip_noise_params(
            dp.noise_multiplier, cpr, dp.clipped_count_stddev)[0]
        drawn = noise.gaussian(rng, d, float(np.float32(z * 1.5)))  # TF Privacy's float32 std
    expected = ((partial.total + drawn) / cpr).astype(np.float32)
    np.testing.assert_array_equal(result, expected)
    assert m["dp_event"] is not None


def test_noise_seed_roots_the_servers_noise_and_os_entropy_is_never_the_run_seed():
    """dp.noise_seed: run (the run's seed), an integer, or os (fresh entropy that
    the driver resolves for the actors alone)."""


    from fedsim.aggregation.base import Partial
    from fedsim.config import ServerConfig, SimConfig
    from fedsim.engine.server import Server
    from fedsim.errors import ConfigError
    from fedsim.simulation import actor_config

    def cfg(noise_seed):
        return SimConfig(clients=10, clients_per_round=2, seed=3, progress=False,
                         server=ServerConfig(weighting="uniform"),
                         dp=DPConfig(mechanism="gaussian", noise_seed=noise_seed))

    with pytest.raises(ConfigError, match="dp.noise_seed=often: allowed is run, os or an "
                                          "integer >= 0"):
        cfg("often")
    assert cfg("run").noise_root() == 3 and cfg("17").noise_root() == 17
    resolved = [actor_config(cfg("os")).dp.noise_seed for _ in range(2)]
    assert all(isinstance(r, int) for r in resolved) and resolved[0] != resolved[1]
    assert actor_config(cfg("run")) == cfg("run")
    with pytest.raises(ValueError, match="resolved"):
        cfg("os").noise_root()

    x = np.zeros((4, 8), np.float32)
    y = np.zeros(4, np.int32)

    def one_step(c):
        server = Server(c, resolve_parts(c), (8,), 3, x, y)
        dim = server.num_parameters()
        partial = Partial(np.zeros(dim), 1.0, 1, {"clipped": 0.0, "zeroed": 0.0})
        server._step(1, 2, partial, [])
        return server.initial_weights - server.weights

    run, same, other = one_step(cfg("run")), one_step(cfg(3)), one_step(cfg(4))
    np.testing.assert_array_equal(run, same)
    assert not np.array_equal(run, other)
    # the update is the noise alone: z * C / clients_per_round per coordinate
    assert abs(run.std() - 0.5 * 2.0 / 2) < 5 * 0.5 / math.sqrt(2 * run.size)

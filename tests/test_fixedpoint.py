"""Fixed-point encoding into Z_(2^bits): range derivation, exact sums, unbiased rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsim.errors import FedsimError
from fedsim.secure.fixedpoint import MAX_BITS, FixedPointCodec, FixedPointError


def _clipped_vectors(rng: np.random.Generator, n: int, d: int, clip: float) -> np.ndarray:
    """``n`` random vectors of dimension ``d`` with L2 norms in [0, clip]."""
    x = rng.normal(size=(n, d)) * rng.exponential(size=(n, 1))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, clip / norms)


def _modular_sum(codec: FixedPointCodec, encoded: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(encoded[0])
    for e in encoded:
        total += e  # uint64 wraparound, then reduce: the sum modulo 2^bits
    return total & np.uint64(codec.modulus - 1)


@pytest.mark.parametrize("n", [1, 7, 100])
@pytest.mark.parametrize("clip", [1.0, 0.05])
def test_decoded_sum_is_within_error_bound(n: int, clip: float) -> None:
    rng = np.random.default_rng(n)
    codec = FixedPointCodec.for_sum(clip, n)
    x = _clipped_vectors(rng, n, 500, clip)
    encoded = [codec.encode(v, rng) for v in x]
    for e in encoded:
        assert e.dtype == np.uint64
        assert int(e.max()) < codec.modulus
    decoded = codec.decode_sum(_modular_sum(codec, encoded), n)
    err = np.abs(decoded - x.sum(axis=0))
    assert err.max() <= codec.error_bound(n) * (1 + 1e-9)
    # the bound is not vacuous: the error is of the order of the rounding step
    assert codec.error_bound(n) == pytest.approx(n * clip / 2**16)


@pytest.mark.parametrize("n", [2, 10, 1000])
def test_bits_are_the_smallest_without_wraparound(n: int) -> None:
    codec = FixedPointCodec.for_sum(1.0, n, precision_bits=16)
    largest_sum = n * (2 * codec.offset + 1)
    assert largest_sum < 2**codec.bits
    assert largest_sum >= 2 ** (codec.bits - 1)  # one bit fewer would not do
    assert codec.bits == math.ceil(math.log2(largest_sum + 1))


@pytest.mark.parametrize("bits", [None, 20])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_no_wraparound_at_the_extremes(bits: int | None, sign: float) -> None:
    n, d, clip = 50, 64, 2.5
    rng = np.random.default_rng(1)
    codec = FixedPointCodec.for_sum(clip, n, bits=bits)
    x = np.full(d, sign * clip)
    encoded = [codec.encode(x, rng) for _ in range(n)]
    exact = sum(int(v) for e in encoded for v in e[:1])  # integer sum of one coordinate
    assert 0 <= exact < codec.modulus
    decoded = codec.decode_sum(_modular_sum(codec, encoded), n)
    np.testing.assert_allclose(decoded, sign * clip * n, rtol=0, atol=codec.error_bound(n))
    # a coordinate beyond the clip is clipped, not wrapped
    far = codec.decode_sum(codec.encode(np.full(d, sign * 1e6), rng), 1)
    np.testing.assert_allclose(far, sign * clip, atol=codec.error_bound(1))


def test_fixed_bits_lower_the_scale_until_no_wrap() -> None:
    free = FixedPointCodec.for_sum(1.0, 100, precision_bits=16)
    fixed = FixedPointCodec.for_sum(1.0, 100, bits=16, precision_bits=16)
    assert fixed.bits == 16 and fixed.scale < free.scale
    assert 100 * (2 * fixed.offset + 1) < 2**16
    roomy = FixedPointCodec.for_sum(1.0, 100, bits=40, precision_bits=16)
    assert roomy.scale == free.scale  # a larger modulus never raises the precision
    with pytest.raises(ValueError, match="too small"):
        FixedPointCodec.for_sum(1.0, 100, bits=8)


def test_stochastic_rounding_is_unbiased() -> None:
    codec = FixedPointCodec.for_sum(1.0, 1, precision_bits=4)  # rounding step 1/16
    rng = np.random.default_rng(7)
    draws = 200_000
    for frac in (0.1, 0.5, 0.93):
        value = (3 + frac) / codec.scale
        decoded = codec.decode_sum(codec.encode(np.full(draws, value), rng), 1)
        assert set(np.unique(decoded * codec.scale)) == {3.0, 4.0}
        sigma = math.sqrt(frac * (1 - frac) / draws) / codec.scale
        assert abs(decoded.mean() - value) < 5 * sigma


def test_encode_does_not_mutate_and_rejects_non_finite() -> None:
    codec = FixedPointCodec.for_sum(1.0, 4)
    x = np.array([0.5, -2.0, 0.25])
    before = x.copy()
    codec.encode(x, np.random.default_rng(0))
    np.testing.assert_array_equal(x, before)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([np.nan]), np.random.default_rng(0))


def test_more_than_62_bits_is_refused() -> None:
    with pytest.raises(ValueError, match="bits=.*more than the 62"):
        FixedPointCodec.for_sum(1.0, 10**6, precision_bits=50)
    with pytest.raises(ValueError, match=r"\[1, 62\]"):
        FixedPointCodec.for_sum(1.0, 10, bits=63)
    with pytest.raises(ValueError, match=r"\[1, 62\]"):
        FixedPointCodec(clip=1.0, num_clients=10, bits=64, scale=1.0)
    with pytest.raises(FedsimError):
        FixedPointCodec(clip=1.0, num_clients=10, bits=MAX_BITS + 1, scale=1.0)


def test_constructor_checks_the_no_wrap_condition() -> None:
    with pytest.raises(FixedPointError, match="too small"):
        FixedPointCodec(clip=1.0, num_clients=10, bits=8, scale=100.0)
    ok = FixedPointCodec(clip=1.0, num_clients=10, bits=12, scale=100.0)
    assert ok.offset == 100
    with pytest.raises(ValueError, match="count=11"):
        ok.decode_sum(np.zeros(3, dtype=np.uint64), 11)
    with pytest.raises(ValueError, match="clip"):
        FixedPointCodec.for_sum(0.0, 10)


@pytest.mark.parametrize("bits", [24, 31, 32])
def test_uint32_encoding_is_the_uint64_encoding_narrowed(bits):
    """Secure aggregation adds words of 32 bits when the modulus allows it."""
    codec = FixedPointCodec.for_sum(1.0, 10, bits=bits, precision_bits=12)
    x = np.random.default_rng(3).uniform(-1.5, 1.5, size=1000)
    wide = codec.encode(x, np.random.default_rng(9))
    narrow = codec.encode(x, np.random.default_rng(9), dtype=np.uint32)
    assert wide.dtype == np.uint64 and narrow.dtype == np.uint32
    np.testing.assert_array_equal(wide, narrow.astype(np.uint64))
    assert wide.max() <= 2 * codec.offset


def test_uint32_encoding_is_refused_for_wider_moduli():
    codec = FixedPointCodec.for_sum(1.0, 10, bits=40)
    with pytest.raises(FixedPointError, match="dtype"):
        codec.encode(np.zeros(3), np.random.default_rng(0), dtype=np.uint32)


def test_encoding_added_into_a_sum_equals_the_sum_of_encodings():
    """A worker holds only the running sum of its clients' encodings (add_to);
    vectors longer than one encoding pass (16384 coordinates) included."""
    codec = FixedPointCodec.for_sum(0.5, 3, bits=30, precision_bits=20)
    xs = np.random.default_rng(4).uniform(-0.6, 0.6, size=(3, 40_000))
    total = np.zeros(40_000, np.uint32)
    for i, x in enumerate(xs):
        codec.encode(x, np.random.default_rng(i), add_to=total)
    expected = sum(codec.encode(x, np.random.default_rng(i)) for i, x in enumerate(xs))
    np.testing.assert_array_equal(total, expected)
    np.testing.assert_allclose(codec.decode_sum(total, 3), xs.clip(-0.5, 0.5).sum(axis=0),
                               atol=codec.error_bound(3))

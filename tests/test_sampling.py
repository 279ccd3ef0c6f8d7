"""RNG streams: one per (seed, purpose, keys), never shared (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.rng import STREAM_NOISE, STREAM_SECAGG, STREAM_SHUFFLE, stream


def first_words(*args: int) -> tuple[int, ...]:
    return tuple(stream(*args).integers(0, 2**63, size=4).tolist())


def test_a_rounds_key_stream_is_not_client_zeros_stream():
    # SeedSequence([s, 5, r]) == SeedSequence([s, 5, r, 0]): the round's key seed
    # used to be drawn from the very stream client 0 rounds and noises with.
    for seed, rnd in [(0, 1), (0, 7), (3, 1)]:
        assert first_words(seed, STREAM_SECAGG, rnd) != first_words(seed, STREAM_SECAGG, rnd, 0)
        assert first_words(seed, STREAM_NOISE, rnd) != first_words(seed, STREAM_NOISE, rnd, 0, 0)


def test_streams_are_distinct_over_a_grid_and_reproducible():
    keys = [(seed, purpose, *rest) for seed in (0, 1) for purpose in (STREAM_SHUFFLE, STREAM_SECAGG)
            for rest in [(), (0,), (0, 0), (1,), (1, 0), (0, 1)]]
    words = [first_words(*k) for k in keys]
    assert len(set(words)) == len(keys)
    assert words == [first_words(*k) for k in keys]  # same keys, same stream


def test_a_large_seed_does_not_spill_into_the_purpose():
    # numpy splits an integer >= 2^32 into two 32-bit words; fixed-width words
    # keep (3 + 5 * 2^32, p) apart from (3, 5, p).
    a = first_words(3 + 5 * 2**32, STREAM_SHUFFLE)
    b = first_words(3, 5, STREAM_SHUFFLE)
    assert a != b


def test_out_of_range_keys_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 2\^64\)"):
        stream(0, STREAM_NOISE, -1)
    with pytest.raises(ValueError):
        stream(2**64, STREAM_NOISE)


def test_stream_draws_are_uniform():
    # a stream is an ordinary PCG64 generator: its draws pass a chi-square check
    counts = np.bincount(stream(0, STREAM_NOISE, 1).integers(0, 10, 100_000), minlength=10)
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 9 + 5 * np.sqrt(18)  # mean 9, std sqrt(2 * 9)

"""Which virtual clients take part in a round.

Every round draws from its own RNG stream, ``stream(seed, SAMPLING, round)``,
so a round's cohort depends only on the seed and the round number (not on what
ran before it), which keeps resumed and re-run simulations identical.
"""

from __future__ import annotations

import numpy as np

# One RNG stream per purpose: these constants are the stream ids.
STREAM_SAMPLING = 1
STREAM_SHUFFLE = 2
STREAM_NOISE = 3
STREAM_INIT = 4
STREAM_SECAGG = 5
STREAM_DROPOUT = 6
STREAM_SECAGG_GRAPH = 7
STREAM_CLIENT_FAULTS = 8
STREAM_AUDIT = 9


def stream(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    """The RNG for ``purpose`` (a ``STREAM_*`` id) at ``keys`` (round, client...).

    The stream's entropy is the words ``[len(keys), seed, purpose, *keys]``, each
    a fixed-width 64-bit word: a prefix-free encoding, so no two different
    ``(seed, purpose, keys)`` share a stream. (numpy's ``SeedSequence`` pads
    short entropy with zeros, so ``SeedSequence([s, 5, r])`` equals
    ``SeedSequence([s, 5, r, 0])``: without the length word, the round's
    secure-aggregation key stream ``(s, SECAGG, r)`` would be client 0's
    encoding stream ``(s, SECAGG, r, 0)``.) Every value must lie in ``[0, 2^64)``.
    """
    words = [len(keys), seed, purpose, *keys]
    for w in words:
        if not 0 <= int(w) < 2**64:
            raise ValueError(f"stream keys must be integers in [0, 2^64), got {w}")
    return np.random.default_rng(np.random.SeedSequence(
        np.array([int(w) for w in words], dtype=np.uint64)))


def sample_clients(population: int, per_round: int, method: str,
                   rng: np.random.Generator) -> np.ndarray:
    """Client ids (sorted int64) for one round.

    uniform: exactly ``per_round`` distinct clients, uniformly without replacement.
    poisson: each client independently with probability ``per_round / population``
      (the cohort size varies; it may be empty). Memory is O(population) for
      poisson's coin flips: 100,000 clients cost 100 kB per round.
    """
    if method == "uniform":
        return np.sort(rng.choice(population, size=per_round, replace=False)).astype(np.int64)
    if method == "poisson":
        q = per_round / population
        return np.flatnonzero(rng.random(population) < q).astype(np.int64)
    raise ValueError(f"sampling must be uniform or poisson, got {method!r}")

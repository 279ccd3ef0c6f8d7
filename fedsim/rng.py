"""Seeded random streams: one independent numpy Generator per ``(seed, purpose, keys)``.

Every random draw in fedsim (cohorts, shuffling, noise, masks, faults, canaries)
comes from :func:`stream`, so a result depends only on the seed and on where
the draw is made (round, client, step), never on the order in which actors ran.
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
STREAM_EVAL_CLIENTS = 10  # which clients federated evaluation visits
STREAM_PERSONALIZE = 11  # personalization evaluation's fine-tuning batches


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

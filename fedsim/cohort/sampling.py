"""Which virtual clients take part in a round.

Every round draws from its own RNG stream,
``fedsim.rng.stream(seed, STREAM_SAMPLING, round)``,
so a round's cohort depends only on the seed and the round number (not on what
ran before it), which keeps resumed and re-run simulations identical.
"""

from __future__ import annotations

import numpy as np


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

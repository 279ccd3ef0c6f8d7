"""Which virtual clients take part in a round (``sampling``, :class:`fedsim.config.SamplingConfig`).

Four schemes:

- ``uniform``: exactly ``per_round`` distinct clients, uniformly without replacement.
- ``poisson``: each client independently with probability ``per_round / population``.
- ``epochs``: the population is shuffled once per epoch and the epoch's rounds
  take consecutive slices of that permutation, so a client takes part at most
  once per epoch of :func:`rounds_per_epoch` rounds (the ``population %
  per_round`` clients left over sit that epoch out).
- ``min_sep`` (separation ``b``): one seeded permutation splits the clients into
  ``b`` fixed groups; round ``t`` draws ``per_round`` clients of group
  ``(t - 1) mod b`` uniformly without replacement, so a client takes part at
  most once every ``b`` rounds.

Every draw is stateless: round ``t``'s cohort depends only on the seed and ``t``
(not on what ran before it), which keeps resumed and re-run simulations
identical. The streams (:func:`fedsim.rng.stream`, purpose ``STREAM_SAMPLING``):

- round ``t``'s own draw (uniform, poisson, min_sep's draw within its group):
  keys ``(t,)``;
- epoch ``e``'s permutation (epochs, ``e`` from 0): keys ``(EPOCH_KEY, e)``;
- min_sep's group permutation: keys ``(GROUP_KEY, b)``.

The two-word keys cannot collide with a round's one-word key (the stream's
encoding is prefix-free), nor with each other (``EPOCH_KEY != GROUP_KEY``).

The pure helpers :func:`rounds_per_epoch`, :func:`max_participations` and
:func:`epoch_step_counts` describe the schemes' participation structure for
privacy accounting (DP-FTRL, matrix-factorization mechanisms).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from fedsim.rng import STREAM_SAMPLING, stream

if TYPE_CHECKING:  # (fedsim.config needs nothing from here)
    from fedsim.config import SamplingConfig

EPOCH_KEY = 0  # first key word of an epoch's permutation stream: (EPOCH_KEY, epoch)
GROUP_KEY = 1  # first key word of min_sep's group permutation stream: (GROUP_KEY, b)

SCHEMES = ("uniform", "poisson", "epochs", "min_sep")


def sample_clients(population: int, per_round: int, method: str,
                   rng: np.random.Generator) -> np.ndarray:
    """Client ids (sorted int64) for one round of a per-round scheme.

    uniform: exactly ``per_round`` distinct clients, uniformly without replacement.
    poisson: each client independently with probability ``per_round / population``
      (the cohort size varies; it may be empty). Memory is O(population) for
      poisson's coin flips: 100,000 clients cost 100 kB per round.
    (``epochs`` and ``min_sep`` need more than one round's stream: :func:`sample_round`.)
    """
    if method == "uniform":
        return np.sort(rng.choice(population, size=per_round, replace=False)).astype(np.int64)
    if method == "poisson":
        q = per_round / population
        return np.flatnonzero(rng.random(population) < q).astype(np.int64)
    raise ValueError(f"sample_clients: sampling must be uniform or poisson, got {method!r}")


def _check_sizes(population: int, per_round: int) -> None:
    if not 1 <= per_round <= population:
        raise ValueError(f"per_round must be in [1, population={population}], got {per_round}")


def rounds_per_epoch(population: int, per_round: int) -> int:
    """Rounds in one epoch of ``sampling=epochs``: ``population // per_round``
    (each round takes ``per_round`` clients of the epoch's permutation; the
    ``population % per_round`` left over sit the epoch out)."""
    _check_sizes(population, per_round)
    return population // per_round


def epoch_cohort(population: int, per_round: int, seed: int, round_num: int) -> np.ndarray:
    """``sampling=epochs``: round ``round_num``'s clients (1-based rounds; sorted int64).

    Round ``t`` is round ``r = (t - 1) % R`` of epoch ``e = (t - 1) // R`` (``R``:
    :func:`rounds_per_epoch`), and takes the slice ``[r * per_round, (r + 1) *
    per_round)`` of epoch ``e``'s permutation of all clients (stream keys
    ``(EPOCH_KEY, e)``). Memory: the O(population) permutation, per call."""
    if round_num < 1:
        raise ValueError(f"rounds are numbered from 1, got {round_num}")
    epoch, r = divmod(round_num - 1, rounds_per_epoch(population, per_round))
    perm = stream(seed, STREAM_SAMPLING, EPOCH_KEY, epoch).permutation(population)
    return np.sort(perm[r * per_round:(r + 1) * per_round]).astype(np.int64)


def min_sep_groups(population: int, min_sep: int, seed: int) -> list[np.ndarray]:
    """``sampling=min_sep``'s ``min_sep`` fixed groups (each sorted int64): group
    ``g`` is ``permutation[g::min_sep]`` of one seeded permutation of all clients
    (stream keys ``(GROUP_KEY, min_sep)``), so the group sizes differ by at most
    one (the smallest has ``population // min_sep`` clients)."""
    if not 1 <= min_sep <= population:
        raise ValueError(f"min_sep must be in [1, population={population}], got {min_sep}")
    perm = stream(seed, STREAM_SAMPLING, GROUP_KEY, min_sep).permutation(population)
    return [np.sort(perm[g::min_sep]).astype(np.int64) for g in range(min_sep)]


def min_sep_cohort(population: int, per_round: int, min_sep: int, seed: int,
                   round_num: int) -> np.ndarray:
    """``sampling=min_sep``: round ``round_num``'s clients (1-based; sorted int64):
    ``per_round`` clients of group ``(round_num - 1) % min_sep``
    (:func:`min_sep_groups`), uniformly without replacement from the round's
    stream (keys ``(round_num,)``). Needs ``per_round <= population // min_sep``."""
    if round_num < 1:
        raise ValueError(f"rounds are numbered from 1, got {round_num}")
    _check_sizes(population, per_round)
    if per_round > population // min_sep:
        raise ValueError(f"min_sep={min_sep} leaves groups of {population // min_sep} clients, "
                         f"fewer than per_round={per_round}")
    group = min_sep_groups(population, min_sep, seed)[(round_num - 1) % min_sep]
    rng = stream(seed, STREAM_SAMPLING, round_num)
    return np.sort(rng.choice(group, size=per_round, replace=False)).astype(np.int64)


def sample_round(sampling: SamplingConfig, population: int, per_round: int, seed: int,
                 round_num: int) -> np.ndarray:
    """Round ``round_num``'s cohort (1-based rounds; sorted int64 client ids)
    under ``sampling`` (:class:`fedsim.config.SamplingConfig`), from ``seed``
    and ``round_num`` alone. uniform and poisson are exactly
    :func:`sample_clients` with the round's stream ``(seed, STREAM_SAMPLING,
    round_num)``."""
    scheme = sampling.scheme
    if scheme in ("uniform", "poisson"):
        return sample_clients(population, per_round, scheme,
                              stream(seed, STREAM_SAMPLING, round_num))
    if scheme == "epochs":
        return epoch_cohort(population, per_round, seed, round_num)
    if scheme == "min_sep":
        if sampling.min_sep is None:
            raise ValueError("sampling=min_sep needs sampling.min_sep")
        return min_sep_cohort(population, per_round, sampling.min_sep, seed, round_num)
    raise ValueError(f"sampling must be one of {', '.join(SCHEMES)}, got {scheme!r}")


class CohortSampler:
    """:func:`sample_round` for one run, with the O(population) work of ``epochs``
    and ``min_sep`` done once instead of every round: an epoch's permutation is
    kept while its rounds are drawn, and min_sep's groups for the whole run.
    The cohorts are exactly :func:`sample_round`'s (the same streams, the same
    draws), in any order of rounds (a resume asks for a later round first).

    Memory: at most one permutation of the population (8 bytes per client)
    for ``epochs``, the groups (the same) for ``min_sep``, nothing for
    ``uniform`` and ``poisson``.
    """

    def __init__(self, sampling: SamplingConfig, population: int, per_round: int,
                 seed: int) -> None:
        self.sampling, self.population, self.per_round, self.seed = (
            sampling, population, per_round, seed)
        self._epoch: Optional[tuple[int, np.ndarray]] = None  # (epoch, its permutation)
        self._groups: Optional[list[np.ndarray]] = None

    def __call__(self, round_num: int) -> np.ndarray:
        """Round ``round_num``'s cohort (1-based; sorted int64 client ids)."""
        scheme, n, k = self.sampling.scheme, self.population, self.per_round
        if round_num < 1 or scheme not in ("epochs", "min_sep"):
            return sample_round(self.sampling, n, k, self.seed, round_num)
        if scheme == "epochs":
            epoch, r = divmod(round_num - 1, rounds_per_epoch(n, k))
            if self._epoch is None or self._epoch[0] != epoch:
                self._epoch = (epoch, stream(self.seed, STREAM_SAMPLING, EPOCH_KEY,
                                             epoch).permutation(n))
            return np.sort(self._epoch[1][r * k:(r + 1) * k]).astype(np.int64)
        b = self.sampling.min_sep
        if b is None or k > n // b:  # (sample_round's one-line errors)
            return sample_round(self.sampling, n, k, self.seed, round_num)
        if self._groups is None:
            self._groups = min_sep_groups(n, b, self.seed)
        group = self._groups[(round_num - 1) % b]
        rng = stream(self.seed, STREAM_SAMPLING, round_num)
        return np.sort(rng.choice(group, size=k, replace=False)).astype(np.int64)


def max_participations(scheme: str, rounds: int, population: int, per_round: int,
                       min_sep: Optional[int] = None) -> Optional[int]:
    """The most rounds any one client can take part in among rounds ``1..rounds``
    under ``scheme`` (whatever the seed):

    - ``epochs``: the epochs those rounds touch, ``ceil(rounds / rounds_per_epoch)``
      (at most once per epoch; the last epoch may be partial);
    - ``min_sep``: ``ceil(rounds / min_sep)`` (group 0 is eligible in rounds 1,
      1 + b, 1 + 2b, ...);
    - ``uniform``, ``poisson``: None, meaning any round (up to ``rounds``).

    ``rounds = 0`` gives 0 (None for uniform and poisson).
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if scheme in ("uniform", "poisson"):
        return None
    if scheme == "epochs":
        return math.ceil(rounds / rounds_per_epoch(population, per_round))
    if scheme == "min_sep":
        if min_sep is None or min_sep < 1:
            raise ValueError(f"sampling=min_sep needs min_sep >= 1, got {min_sep}")
        return math.ceil(rounds / min_sep)
    raise ValueError(f"sampling must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def epoch_step_counts(rounds: int, rounds_per_epoch: int) -> list[int]:
    """Rounds run in each epoch touched by rounds ``1..rounds`` (``sampling=epochs``):
    ``rounds_per_epoch`` for every complete epoch, then the partial last epoch's
    count if any; e.g. ``epoch_step_counts(25, 10) == [10, 10, 5]``, ``(20, 10)``
    gives ``[10, 10]`` and ``(0, 10)`` gives ``[]``. Its length is
    :func:`max_participations` for ``epochs``."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds_per_epoch < 1:
        raise ValueError(f"rounds_per_epoch must be >= 1, got {rounds_per_epoch}")
    full, rest = divmod(rounds, rounds_per_epoch)
    return [rounds_per_epoch] * full + ([rest] if rest else [])

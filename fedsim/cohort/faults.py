"""Simulated client faults: dropouts, stragglers and over-selection.

Real devices vanish mid-round and some are slow. Each round, after the cohort
is sampled, :func:`plan_round` decides from the run's seed (stream
``(seed, CLIENT_FAULTS, round)``) what happens to every sampled client:

1. **dropout**: with probability ``faults.client_dropout`` the client goes
   offline before it uploads (its update never reaches the server);
2. **straggler**: every client gets a device time ``exp(sigma * N(0, 1))``
   (relative to the median device; ``sigma = faults.device_speed_sigma``); a
   client slower than ``faults.straggler_timeout`` misses the deadline;
3. **over-selection**: ``ceil(clients_per_round * (1 + faults.over_selection))``
   clients are sampled, and the server aggregates the first
   ``clients_per_round`` to finish (the fastest), as production systems do
   (Bonawitz et al., "Towards Federated Learning at Scale", 2019).

Clients that drop, straggle or are not needed are not trained (their work would
be discarded). Under secure aggregation they did take part in the key
exchange, so the protocol recovers their masks (they count as dropouts before
the masked input). Dropouts *after* masking are ``secagg.dropout``.

Privacy: the accountant charges every round for the *sampled* cohort size
(over-selection included). Faults only remove clients from a sampled cohort,
independently of their data, and the noise is calibrated to one client's clip
on the sum, not to the number that report, so the guarantee holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedsim.config import FaultsConfig


@dataclass(frozen=True)
class RoundPlan:
    """What happens to one round's sampled cohort (all arrays: sorted client ids).

    sampled: every client sampled (what the accountant charges for).
    reporting: the clients whose updates are aggregated.
    dropped: went offline before upload. stragglers: missed the deadline.
    unused: finished, but after the first ``clients_per_round`` (over-selection).
    """

    sampled: np.ndarray
    reporting: np.ndarray
    dropped: np.ndarray
    stragglers: np.ndarray
    unused: np.ndarray

    def counts(self) -> dict[str, int]:
        """Per-round metrics: how many clients were sampled, and lost to each fault."""
        return {"sampled": int(self.sampled.size), "dropped": int(self.dropped.size),
                "stragglers": int(self.stragglers.size), "unused": int(self.unused.size)}


def sample_size(clients_per_round: int, faults: FaultsConfig, population: int) -> int:
    """Clients to sample per round: ``clients_per_round``, plus the over-selection."""
    return min(population, math.ceil(clients_per_round * (1.0 + faults.over_selection)))


def plan_round(sampled: np.ndarray, clients_per_round: int, faults: FaultsConfig,
               rng: np.random.Generator) -> RoundPlan:
    """Decide the fate of each sampled client (pure; ``rng`` is the round's fault stream).

    The draws are made for every sampled client in id order whatever the
    options, so turning one fault on does not change the others' draws.
    """
    sampled = np.sort(np.asarray(sampled, np.int64))
    offline = rng.random(sampled.size) < faults.client_dropout
    device_time = np.exp(faults.device_speed_sigma * rng.standard_normal(sampled.size))
    late = ~offline & (device_time > (faults.straggler_timeout or math.inf))
    finished = ~offline & ~late
    unused = np.zeros(sampled.size, bool)
    if faults.over_selection > 0:
        order = np.flatnonzero(finished)[np.argsort(device_time[finished], kind="stable")]
        unused[order[clients_per_round:]] = True
    return RoundPlan(sampled=sampled, reporting=sampled[finished & ~unused],
                     dropped=sampled[offline], stragglers=sampled[late], unused=sampled[unused])

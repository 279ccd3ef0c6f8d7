"""The server algorithm protocol: its state, what it sends the clients each
round, and how it applies the round's aggregate to the global model.

State is explicit and flows in and out (as in TFF's templates): a dict of numpy
arrays and numbers, so it can be checkpointed; no method mutates its inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Union

import numpy as np

from fedsim.config import SimConfig, build_named

State = dict[str, Any]

BUILTIN = {"fedavg": "fedsim.algorithms.fedavg:FedAvg"}


class Algorithm(ABC):
    """A federated algorithm on the server.

    :meth:`apply` is the one abstract method: ``(state, weights, aggregate) ->
    (new state, new weights)``, where ``aggregate`` is the aggregator's output
    (for FedAvg-style algorithms the mean client delta ``global - local``, a
    pseudo-gradient). :meth:`client_payload` is what every client of a round
    receives besides the weights (e.g. FedProx's ``proximal_mu``); the trainers
    honour the keys they know (``proximal_mu``) and refuse none.
    """

    name: str = ""
    client_features: frozenset[str] = frozenset()
    """The payload keys the clients must honour (checked against the trainer
    before anything runs: :func:`fedsim.client.features.trainer_features`)."""

    def initial_state(self, weights: np.ndarray) -> State:
        """The algorithm's state for the initial global ``weights`` (flat float32)."""
        return {}

    def client_payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """What every client of the round gets besides the weights (picklable)."""
        return {}

    @abstractmethod
    def apply(self, state: Mapping[str, Any], weights: np.ndarray,
              aggregate: np.ndarray) -> tuple[State, np.ndarray]:
        """One server step: returns (new state, new weights, float32)."""


def resolve_algorithm(algorithm: Union[str, Algorithm, None], cfg: SimConfig) -> Algorithm:
    """The Algorithm that ``algorithm`` names: a built-in name (``fedavg``), a
    ``module:callable`` called with the run's :class:`SimConfig` (a subclass or a
    factory), or an Algorithm object given from Python (returned as is)."""
    if isinstance(algorithm, Algorithm):
        return algorithm
    name = str(algorithm or "fedavg")
    made = build_named(BUILTIN.get(name, name), "algorithm", Algorithm, cfg)
    if not made.name:
        made.name = name
    return made

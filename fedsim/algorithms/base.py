"""The server algorithm protocol: its state, what it sends the clients each
round, and how it applies the round's aggregate to the global model.

State is explicit and flows in and out (as in TFF's templates): a dict of numpy
arrays and numbers, so it can be checkpointed; no method mutates its inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from fedsim.config import AlgorithmConfig, SimConfig, build_named

State = dict[str, Any]

ClientSums = dict[str, tuple[np.ndarray, float]]
"""Additive per-client vectors besides the model update, each as ``(weighted
sum, sum of weights)``: the worker adds them up over its clients (one sum per
worker, as for the update) and :meth:`Algorithm.apply` gets the round's totals."""

BUILTIN = {"fedavg": "fedsim.algorithms.fedavg:FedAvg",
           "fedprox": "fedsim.algorithms.fedprox:FedProx",
           "scaffold": "fedsim.algorithms.scaffold:Scaffold",
           "mime_lite": "fedsim.algorithms.mime_lite:MimeLite"}


@dataclass(frozen=True)
class ClientOutput:
    """What the client side of an algorithm returns for one client.

    result: the trainer's :class:`fedsim.client.local.ClientResult` (its
      ``delta`` goes to the aggregator, clipped and noised there if DP).
    sums: additive vectors the server needs besides the update (e.g. Mime's
      full gradient, SCAFFOLD's control-variate change), as :data:`ClientSums`.
    state: the client's new state (stateful algorithms), field -> float32
      vector, or None to keep it; written when the round is committed.
    """

    result: Any
    sums: ClientSums = field(default_factory=dict)
    state: Optional[Mapping[str, np.ndarray]] = None


def add_sums(a: Mapping[str, tuple[np.ndarray, float]],
             b: Mapping[str, tuple[np.ndarray, float]]) -> ClientSums:
    """The sum of two :data:`ClientSums` (new arrays; the inputs are kept)."""
    out: ClientSums = dict(a)
    for k, (v, w) in b.items():
        if k in out:
            out[k] = (out[k][0] + v, out[k][1] + w)
        else:
            out[k] = (np.asarray(v, np.float64), float(w))
    return out


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
    """The trainer options the clients must honour (checked against the trainer
    before anything runs: :func:`fedsim.client.features.trainer_features`)."""

    def client_state_fields(self, num_parameters: int) -> dict[str, int]:
        """The per-client state this algorithm keeps, field -> float32 length
        (e.g. SCAFFOLD's ``{"control": num_parameters}``); {} : stateless. A
        client that never trained has zeros."""
        return {}

    def initial_state(self, weights: np.ndarray) -> State:
        """The algorithm's state for the initial global ``weights`` (flat float32)."""
        return {}

    def client_payload(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """What every client of the round gets besides the weights (picklable)."""
        return {}

    def client_update(self, train: Callable[..., Any], payload: Mapping[str, Any],
                      client_state: Mapping[str, np.ndarray]) -> ClientOutput:
        """The client side, run in the worker for each client: ``train(**options)``
        trains it from the global weights (the options are the trainer's, e.g.
        ``proximal_mu``, see :func:`fedsim.client.features.trainer_features`) and
        returns its ClientResult; ``payload`` is :meth:`client_payload`'s;
        ``client_state`` the client's stored state ({} when stateless). The
        default trains with the payload as the options."""
        return ClientOutput(train(**payload))

    @abstractmethod
    def apply(self, state: Mapping[str, Any], weights: np.ndarray, aggregate: np.ndarray,
              sums: Mapping[str, tuple[np.ndarray, float]]) -> tuple[State, np.ndarray]:
        """One server step: returns (new state, new weights, float32). ``sums``:
        the round's totals of the clients' :attr:`ClientOutput.sums`."""


def resolve_algorithm(algorithm: Union[str, AlgorithmConfig, Algorithm, None],
                      cfg: SimConfig) -> Algorithm:
    """The Algorithm that ``algorithm`` names: a built-in name (``fedavg``), a
    ``module:callable`` called with the run's :class:`SimConfig` and
    ``algorithm.args`` as keywords (a subclass or a factory), or an Algorithm
    object given from Python (returned as is)."""
    if isinstance(algorithm, Algorithm):
        return algorithm
    if isinstance(algorithm, AlgorithmConfig):
        name, args = algorithm.name, algorithm.args
    else:
        name, args = str(algorithm or "fedavg"), {}
    if name in BUILTIN:
        made = build_named(BUILTIN[name], "algorithm.name", Algorithm, cfg)
    else:
        made = build_named(name, "algorithm.name", Algorithm, cfg, **args)
    if not made.name:
        made.name = name
    return made

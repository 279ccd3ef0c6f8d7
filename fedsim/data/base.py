"""What a simulation asks of a dataset: :class:`ClientData` (one client's
examples on request) and :class:`FederatedData` (the clients plus a central
test split). A user's own dataset is any object with these two members."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ClientData(Protocol):
    """The training data of a population of clients, as a worker sees it."""

    @property
    def num_clients(self) -> int:
        """Size of the population; client ids are ``0 .. num_clients - 1``."""
        ...

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Training examples of client ``cid``: x float32 ``(n, *input_shape)``,
        y int32 ``(n,)``, with ``n >= 1``."""
        ...


@dataclass(frozen=True)
class FederatedData:
    """Everything a simulation needs from a dataset.

    train: the clients' training data. x_test, y_test: the global test split
    (float32 ``(m, *input_shape)``, int32 ``(m,)``) the server evaluates on.
    num_classes: labels lie in ``[0, num_classes)``. input_shape: shape of one
    example. name: the dataset (``DataConfig.name``).
    """

    train: ClientData
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    name: str


def check_federated_data(data: object, clients: int) -> FederatedData:
    """``data`` given from Python (``run_simulation(cfg, data=...)``), checked: a
    FederatedData whose ``train`` has ``num_clients`` >= ``clients`` (the
    population is clients ``0 .. clients - 1``) and a ``client`` method, and
    whose test split has as many labels as examples. One-line ConfigError
    naming ``data`` or ``clients`` otherwise. Returns ``data``."""
    from fedsim.errors import ConfigError

    if not isinstance(data, FederatedData):
        raise ConfigError("data", "a fedsim.data.base.FederatedData (train, x_test, y_test, "
                          "num_classes, input_shape, name)", type(data).__name__)
    train = data.train
    n = getattr(train, "num_clients", None)
    if not callable(getattr(train, "client", None)) or not isinstance(n, (int, np.integer)):
        raise ConfigError("data", "a FederatedData whose train has num_clients (an int) and "
                          "client(cid) -> (x, y)", type(train).__name__)
    if clients > n:
        raise ConfigError("clients", f"at most data.train.num_clients={int(n)} (the population "
                          f"is clients 0 .. clients - 1 of data={data.name})", clients)
    if len(data.x_test) != len(data.y_test) or len(data.y_test) == 0:
        raise ConfigError("data", f"a FederatedData with a non-empty test split of as many "
                          f"labels as examples ({len(data.x_test)} examples, "
                          f"{len(data.y_test)} labels)", data.name)
    if tuple(np.shape(data.x_test)[1:]) != tuple(data.input_shape):
        raise ConfigError("data", f"a FederatedData whose x_test examples have input_shape="
                          f"{tuple(data.input_shape)} (they have {np.shape(data.x_test)[1:]})",
                          data.name)
    return data

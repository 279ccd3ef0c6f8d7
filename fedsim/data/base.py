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

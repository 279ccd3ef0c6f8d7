"""What a simulation asks of a dataset: :class:`ClientData` (one client's
examples on request) and :class:`FederatedData` (the clients plus a central
test split and the task kind). A user's own population is any object with
``num_clients`` and ``client``; :class:`ExampleSpec` is the layout of its
tensors, read off the test split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class ClientData(Protocol):
    """The training data of a population of clients, as a worker sees it."""

    @property
    def num_clients(self) -> int:
        """Size of the population; client ids are ``0 .. num_clients - 1``."""
        ...

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Training examples of client ``cid``, ``n >= 1`` of them: x
        ``(n, *input_shape)``, y ``(n, *label_shape)``, in the dtypes of the
        :class:`ExampleSpec` (float32 or int32 inputs; int32 or float32 labels).

        A population whose clients also hold their OWN test examples (TFF's
        EMNIST writers, Shakespeare roles, LEAF users) offers the capability
        ``client_test(cid) -> (x, y)``: client ``cid``'s test examples (possibly
        none: zero-length arrays of the same layout). Federated evaluation and
        personalization evaluation ask for it (``hasattr``)."""
        ...


@dataclass(frozen=True)
class ExampleSpec:
    """The layout of a dataset's tensors, without the example axis.

    input_shape, input_dtype: one input (``float32`` features or images,
    ``int32`` token ids). label_shape, label_dtype: one label (``()`` int32
    class ids; ``(T,)`` int32 next tokens; ``(K,)`` float32 multi-hot tags;
    float32 regression targets). The trainers' compiled graphs are traced for
    exactly this layout.
    """

    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    label_shape: tuple[int, ...] = ()
    label_dtype: str = "int32"

    @property
    def is_default(self) -> bool:
        """float32 inputs and one int32 label per example (image/feature
        classification: what every trainer has always supported)."""
        return (self.input_dtype, self.label_shape, self.label_dtype) == ("float32", (), "int32")

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> "ExampleSpec":
        """The layout of examples ``x`` and labels ``y`` (integer arrays are
        int32, everything else float32)."""
        def kind(a: np.ndarray) -> str:
            return "int32" if np.issubdtype(np.asarray(a).dtype, np.integer) else "float32"

        return cls(tuple(int(d) for d in np.shape(x)[1:]), kind(x),
                   tuple(int(d) for d in np.shape(y)[1:]), kind(y))

    def cast(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``x`` and ``y`` in this layout's dtypes (no copy when they already are)."""
        return (np.asarray(x, dtype=self.input_dtype), np.asarray(y, dtype=self.label_dtype))


@dataclass(frozen=True)
class FederatedData:
    """Everything a simulation needs from a dataset.

    train: the clients' training data. x_test, y_test: the global test split
    the server evaluates on (``(m, *input_shape)`` and ``(m, *label_shape)``;
    their dtypes and shapes are the run's :class:`ExampleSpec`). num_classes:
    the model's output width (classes, vocabulary size incl. special tokens,
    tags; 1 for binary and scalar regression). input_shape: shape of one
    example. name: the dataset (``DataConfig.name``). task: the task kind, a
    :class:`fedsim.tasks.base.Task` or a built-in kind's name
    (``classification``, ``next_token``, ``multilabel``, ``binary``,
    ``regression``).
    """

    train: ClientData
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    task: Any = "classification"

    @property
    def example(self) -> ExampleSpec:
        """The layout of this dataset's tensors (read off the test split)."""
        return ExampleSpec.of(self.x_test, self.y_test)


def own_test_split(train: Any) -> tuple[np.ndarray, np.ndarray]:
    """The union of every client's own test examples (``client_test``), in client
    order: the central test split of a population whose clients hold their own."""
    parts = [train.client_test(c) for c in range(train.num_clients)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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

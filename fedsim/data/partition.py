"""Partitions of a centralized labelled dataset over virtual clients.

A :class:`Partition` is stored compactly, in memory O(examples + clients): one
array with every client's example indices back to back, and one array of
offsets into it (the CSR layout of a sparse matrix). No Python object is
created per client, so populations of 100,000 clients cost a few megabytes.

Everything here is pure numpy and deterministic given the
:class:`numpy.random.Generator` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.errors import ConfigError


@dataclass(frozen=True)
class Partition:
    """Which examples each client owns.

    indices: int64, the concatenation of every client's example indices (row
      numbers into the centralized dataset); within a client, sorted ascending.
    offsets: int64, shape ``(num_clients + 1,)``, non-decreasing, ``offsets[0] == 0``
      and ``offsets[-1] == len(indices)``; client ``c`` owns
      ``indices[offsets[c]:offsets[c + 1]]``.

    The arrays are shared, not copied: do not modify them (nor the views that
    :meth:`client_indices` returns).
    """

    indices: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if self.indices.ndim != 1 or self.offsets.ndim != 1 or len(self.offsets) < 1:
            raise ValueError("Partition: indices and offsets must be 1-D, offsets non-empty")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.indices):
            raise ValueError("Partition: offsets must start at 0 and end at len(indices)")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("Partition: offsets must be non-decreasing")

    @property
    def num_clients(self) -> int:
        """Number of clients (some may own no example if built by hand)."""
        return len(self.offsets) - 1

    def client_indices(self, c: int) -> np.ndarray:
        """Sorted example indices of client ``c`` (a read-only view, int64)."""
        if not 0 <= c < self.num_clients:
            raise IndexError(f"client {c} out of range [0, {self.num_clients})")
        return self.indices[self.offsets[c]:self.offsets[c + 1]]

    def sizes(self) -> np.ndarray:
        """Number of examples of every client, int64, shape ``(num_clients,)``."""
        return np.diff(self.offsets)

    @staticmethod
    def from_assignment(client_of: np.ndarray, num_clients: int) -> Partition:
        """Build a partition from the client of every example.

        client_of: int array, shape ``(num_examples,)``: ``client_of[i]`` is the
        client that owns example ``i``. Each client's indices come out sorted.
        """
        client_of = np.asarray(client_of, dtype=np.int64)
        # lexsort's last key is the primary one: by client, then by example index.
        indices = np.lexsort((np.arange(len(client_of)), client_of)).astype(np.int64)
        offsets = np.zeros(num_clients + 1, dtype=np.int64)
        np.cumsum(np.bincount(client_of, minlength=num_clients), out=offsets[1:])
        return Partition(indices=indices, offsets=offsets)


def _check_clients(num_examples: int, num_clients: int) -> None:
    """Refuse a population that cannot give every client an example."""
    if num_clients < 1:
        raise ConfigError("clients", "an integer >= 1", num_clients)
    if num_clients > num_examples:
        raise ConfigError(
            "clients",
            f"at most the {num_examples} training examples of this dataset "
            "(use data=synthetic for larger populations)",
            num_clients,
        )


def iid_partition(num_examples: int, num_clients: int, rng: np.random.Generator) -> Partition:
    """Uniformly random split of ``num_examples`` examples into near-equal shares.

    Every client gets ``floor(n / k)`` or ``ceil(n / k)`` examples, drawn without
    replacement. Raises :class:`ConfigError` if ``num_clients > num_examples``.
    """
    _check_clients(num_examples, num_clients)
    perm = rng.permutation(num_examples)
    # Position p of the permutation goes to client floor(p * k / n): shares differ by <= 1.
    client_of = np.empty(num_examples, dtype=np.int64)
    client_of[perm] = (np.arange(num_examples, dtype=np.int64) * num_clients) // num_examples
    return Partition.from_assignment(client_of, num_clients)


def _donations(sizes: np.ndarray, wanted: int) -> np.ndarray:
    """How many examples each client gives when ``wanted`` examples are taken one
    at a time from the currently largest client (ties: lowest client id first).

    Computed in closed form (water-filling) rather than step by step: the largest
    clients are cut down to a level ``L`` and the first ``r`` clients (by id) at
    that level give one more. Returns int64, shape like ``sizes``.
    """
    sizes = sizes.astype(np.int64)

    def excess(level: int) -> int:
        return int(np.maximum(sizes - level, 0).sum())

    # Smallest level L >= 0 with excess(L) <= wanted (excess is non-increasing).
    lo, hi = 0, int(sizes.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if excess(mid) <= wanted:
            hi = mid
        else:
            lo = mid + 1
    level = lo
    give = np.maximum(sizes - level, 0)
    rest = wanted - int(give.sum())
    if rest > 0:  # then level > 0, and more than `rest` clients stand at it
        at_level = np.flatnonzero(sizes >= level)[:rest]
        give[at_level] += 1
    return give


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> Partition:
    """Label-skewed split (Yurochkin et al. 2019; Flower's ``DirichletPartitioner``).

    For each class, the class's examples are shuffled and split over the clients
    in proportions drawn from ``Dir(alpha * ones(num_clients))`` (split points
    ``floor(cumsum(proportions) * class_size)``). Smaller ``alpha`` is more
    skewed; ``alpha -> inf`` tends to an iid split.

    Afterwards every client is made non-empty: as many examples as there are
    empty clients are taken, one at a time, from the currently largest client
    (ties: lowest id; a random one of that donor's examples), and the empty
    clients, in id order, get one each (in donor-id order). Each client's
    indices are sorted.

    labels: int array, shape ``(num_examples,)``, class of every example.
    Raises :class:`ConfigError` if ``num_clients > num_examples``. Runs in
    O(examples * log + classes * clients) time with numpy, memory O(examples + clients).
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    if not alpha > 0:
        raise ConfigError("data.alpha", "a finite number > 0", alpha)

    concentration = np.full(num_clients, float(alpha))
    client_ids = np.arange(num_clients, dtype=np.int64)
    # Examples in a random order (shuffled within each class), with their clients.
    order_parts: list[np.ndarray] = []
    client_parts: list[np.ndarray] = []
    for cls in np.unique(labels):  # O(classes) loop; each step is vectorized
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        proportions = rng.dirichlet(concentration)
        bounds = np.empty(num_clients + 1, dtype=np.int64)
        bounds[0] = 0
        bounds[1:] = np.floor(np.cumsum(proportions) * len(members))
        bounds[-1] = len(members)  # guard against the cumulative sum rounding off 1
        np.clip(bounds, 0, len(members), out=bounds)
        order_parts.append(members)
        client_parts.append(np.repeat(client_ids, np.diff(bounds)))
    order = np.concatenate(order_parts)
    owner = np.concatenate(client_parts)  # owner[j] owns example order[j]

    sizes = np.bincount(owner, minlength=num_clients)
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        give = _donations(sizes, len(empty))
        # Group the (randomly ordered) examples by client, keeping their order,
        # and take each donor's last `give` examples: random ones of the donor.
        grouped = np.argsort(owner, kind="stable")
        starts = np.concatenate((np.zeros(1, np.int64), np.cumsum(sizes)[:-1]))
        grouped_owner = owner[grouped]
        rank = np.arange(n) - starts[grouped_owner]
        moved = grouped[rank >= sizes[grouped_owner] - give[grouped_owner]]
        # `moved` is ordered by donor id, then random order; hand out in id order.
        owner[moved] = empty

    client_of = np.empty(n, dtype=np.int64)
    client_of[order] = owner
    return Partition.from_assignment(client_of, num_clients)


def label_skew(labels: np.ndarray, partition: Partition, num_classes: int) -> float:
    """Label heterogeneity of a partition, in [0, 1]; 0 for a perfectly iid one.

    The size-weighted mean over clients of the total-variation distance between
    the client's label distribution and the global one (of all examples in the
    partition): ``sum_c (n_c / n) * 0.5 * sum_k |p_ck - p_k|``. Empty clients
    weigh 0. Computed from the non-zero (client, class) counts only, so memory is
    O(examples), not O(clients * classes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    part_labels = labels[partition.indices]
    n = len(part_labels)
    if n == 0:
        return 0.0
    if part_labels.min() < 0 or part_labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    sizes = partition.sizes()
    owner = np.repeat(np.arange(partition.num_clients, dtype=np.int64), sizes)
    p_global = np.bincount(part_labels, minlength=num_classes) / n

    pairs, counts = np.unique(owner * num_classes + part_labels, return_counts=True)
    pair_client, pair_class = np.divmod(pairs, num_classes)
    p_client = counts / sizes[pair_client]
    # For one client: sum_k |p_ck - p_k| = 1 + sum_{k present} (|p_ck - p_k| - p_k),
    # since the absent classes contribute p_k each and sum_k p_k = 1.
    present_terms = np.abs(p_client - p_global[pair_class]) - p_global[pair_class]
    per_client = 1.0 + np.bincount(pair_client, weights=present_terms,
                                   minlength=partition.num_clients)
    per_client[sizes == 0] = 0.0
    return float(0.5 * np.sum(sizes / n * per_client))

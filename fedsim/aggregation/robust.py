"""Robust aggregation: aggregates that are not sums (``aggregator.kind=median``,
``trimmed_mean``, ``krum``, ``multi_krum``, ``bulyan``).

A robust aggregate needs every client's update, so the partial a worker sends
is the STACK of its clients' records instead of their sum:

- :meth:`RobustAggregator.record`: one client's update as a one-row float64
  stack; a non-finite update is replaced by zeros (counted in ``zeroed``, as
  :class:`fedsim.aggregation.base.MeanAggregator` does) and, with ``clip``, the
  update is scaled to L2 norm at most ``clip`` (counted in ``clipped``);
- :meth:`RobustAggregator.merge`: the concatenation of two stacks;
- :meth:`RobustAggregator.finalize`: puts the rows in a canonical order (by
  their bytes), so that the aggregate does not depend on how the clients were
  split across workers or in which order the partials were merged, then
  applies the kind's rule (:meth:`RobustAggregator.aggregate`).

Every client counts once (example weights are ignored: ``server.weighting``
must be ``uniform``). The aggregate of a round without reporters is zeros.
Robust aggregators cannot be summed under secure aggregation
(``supports_secure_sum`` is False) and carry no DP guarantee; the config
refuses both compositions (:meth:`fedsim.config.SimConfig._check_robust`).

Krum-based rules (Krum, Multi-Krum, Bulyan) tolerate ``f`` Byzantine clients
among n reporters only when n is large enough (Krum: n > 2f + 2; Bulyan:
n >= 4f + 3). A round with fewer reporters (dropouts) uses the largest f
they allow (:func:`krum_f`, :func:`bulyan_f`), reported as ``robust_f``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Mapping, Optional

import numpy as np

from fedsim.aggregation.base import Aggregator, Partial


def canonical_order(stack: np.ndarray) -> np.ndarray:
    """The rows of ``stack`` sorted by their bytes (ties keep their order): a
    fixed order whatever order the clients were stacked in."""
    order = sorted(range(stack.shape[0]), key=lambda i: stack[i].tobytes())
    return stack[order]


def pairwise_sq_distances(stack: np.ndarray) -> np.ndarray:
    """The [n, n] matrix of squared L2 distances between the rows of ``stack``
    (float64, computed from the differences, zero diagonal)."""
    n = stack.shape[0]
    out = np.zeros((n, n), np.float64)
    for i in range(n - 1):
        diff = stack[i + 1:] - stack[i]
        d = np.einsum("ij,ij->i", diff, diff)
        out[i, i + 1:] = d
        out[i + 1:, i] = d
    return out


def krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each of n updates (Blanchard et al. 2017): the sum of its
    squared distances to its ``n - f - 2`` nearest other updates (at least 1, at
    most the n - 1 others, as Flower's ``aggregate_krum``); ``dist`` from
    :func:`pairwise_sq_distances`."""
    n = dist.shape[0]
    k = min(max(n - f - 2, 1), n - 1)
    if k <= 0:
        return np.zeros(n, np.float64)
    others = dist + np.diag(np.full(n, np.inf))
    return np.sort(others, axis=1)[:, :k].sum(axis=1)


def krum_f(n: int, f: int) -> int:
    """The largest f' <= f with n > 2f' + 2 (0 if there is none): the f that
    Krum and Multi-Krum use among n reporters."""
    return max(0, min(f, (n - 3) // 2))


def bulyan_f(n: int, f: int) -> int:
    """The largest f' <= f with n >= 4f' + 3 (0 if there is none): the f that
    Bulyan uses among n reporters."""
    return max(0, min(f, (n - 3) // 4))


class RobustAggregator(Aggregator):
    """The stacking semantics shared by the robust aggregators (see the module
    docstring); subclasses implement :meth:`aggregate`.

    clip: scale each update to L2 norm at most ``clip`` before it is stacked
    (null: no clipping). Measurements: ``zeroed`` (non-finite updates replaced
    by zeros), with a clip ``clip`` and ``clipped_fraction`` (of the reporting
    clients), and the kind's own (:meth:`aggregate`).
    """

    supports_secure_sum = False
    kind: str = ""

    def __init__(self, clip: Optional[float] = None) -> None:
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip!r}")
        self.clip = None if clip is None else float(clip)

    def zero_stats(self) -> dict[str, float]:
        return {"zeroed": 0.0, "clipped": 0.0}

    def zero_partial(self, size: int) -> Partial:
        """An empty stack of updates of ``size`` parameters (0 rows)."""
        return Partial(np.zeros((0, int(size)), np.float64), 0.0, 0, self.zero_stats())

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        """One client's update as a one-row stack (float64, a copy): zeros if it
        is not finite, scaled to L2 norm ``clip`` if it is longer. Its weight is
        1 whatever ``num_examples``."""
        d = np.array(delta, np.float64).reshape(-1)
        zeroed = not bool(np.isfinite(d).all())
        if zeroed:
            d = np.zeros_like(d)
        clipped = False
        if self.clip is not None:
            norm = float(np.linalg.norm(d))
            if norm > self.clip:
                d = d * (self.clip / norm)
                clipped = True
        return Partial(d.reshape(1, -1), 1.0, 1,
                       {"zeroed": float(zeroed), "clipped": float(clipped)})

    def merge(self, a: Partial, b: Partial) -> Partial:
        """The two stacks one above the other (and their counts and stats summed)."""
        if a.total.ndim != 2 or b.total.ndim != 2 or a.total.shape[1] != b.total.shape[1]:
            raise ValueError("cannot merge partials of different aggregators or model sizes: "
                             f"stacks of shape {a.total.shape} and {b.total.shape}")
        stats = dict(a.stats)
        for k, v in b.stats.items():
            stats[k] = stats.get(k, 0.0) + v
        return Partial(np.concatenate([a.total, b.total], axis=0), a.weight + b.weight,
                       a.count + b.count, stats)

    def current_clip(self, state: Mapping[str, Any]) -> Optional[float]:
        return self.clip

    @abstractmethod
    def aggregate(self, stack: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """The kind's aggregate of ``stack`` ([n, size] float64, n >= 1, rows in
        canonical order) and its measurements."""

    def empty_measurements(self) -> dict[str, Any]:
        """The kind's measurements of a round without reporters."""
        return {}

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        """The kind's aggregate of the stacked updates (float32; zeros without
        reporters); no noise is drawn, so ``rng`` is unused."""
        stack = np.asarray(partial.total, np.float64)
        if stack.ndim != 2:
            raise ValueError(f"a robust aggregator needs a stack of updates, got shape "
                             f"{stack.shape}")
        if stack.shape[0] == 0:
            result, own = np.zeros(stack.shape[1], np.float64), self.empty_measurements()
        else:
            result, own = self.aggregate(canonical_order(stack))
        measurements: dict[str, Any] = {"zeroed": int(partial.stats.get("zeroed", 0.0))}
        if self.clip is not None:
            measurements["clip"] = self.clip
            measurements["clipped_fraction"] = (partial.stats.get("clipped", 0.0)
                                                / max(partial.count, 1))
        measurements.update(own)
        return np.asarray(result, np.float32), dict(state), measurements


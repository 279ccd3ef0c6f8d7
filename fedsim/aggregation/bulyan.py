"""``aggregator.kind=bulyan`` (El Mhamdi, Guerraoui and Rouault, ICML 2018;
Flower's ``Bulyan``)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from fedsim.aggregation.robust import (
    RobustAggregator,
    bulyan_f,
    krum_scores,
    pairwise_sq_distances,
)


class BulyanAggregator(RobustAggregator):
    """Bulyan over the n reporting clients' (clipped) updates, with f Byzantine.

    1. Selection: ``theta = n - 2f`` updates, one at a time: Krum (its scores
       with the same f, :func:`fedsim.aggregation.robust.krum_scores`) over the
       updates not yet selected picks the next one (ties: the first in the
       canonical order).
    2. Aggregation: per coordinate, the mean of the ``beta = theta - 2f``
       selected values closest to their median (the selected updates'
       coordinate-wise median).

    byzantine: f; a round with fewer than 4f + 3 reporters uses the largest f
    they allow. Measurements: ``robust_f`` (the f used), ``robust_selected``
    (theta) and ``robust_kept`` (beta).
    """

    kind = "bulyan"

    def __init__(self, byzantine: Optional[int], clip: Optional[float] = None) -> None:
        super().__init__(clip)
        if byzantine is None or byzantine < 0:
            raise ValueError(f"byzantine must be an integer >= 0, got {byzantine!r}")
        self.byzantine = int(byzantine)

    def selection(self, stack: np.ndarray) -> tuple[list[int], int]:
        """The indices of the theta rows iterated Krum selects (in the order
        selected) and the f used."""
        n = stack.shape[0]
        f = bulyan_f(n, self.byzantine)
        dist = pairwise_sq_distances(stack)
        remaining = list(range(n))
        selected: list[int] = []
        while len(selected) < n - 2 * f:
            sub = dist[np.ix_(remaining, remaining)]
            selected.append(remaining.pop(int(np.argmin(krum_scores(sub, f)))))
        return selected, f

    def aggregate(self, stack: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        selected, f = self.selection(stack)
        chosen = stack[selected]
        beta = len(selected) - 2 * f
        median = np.median(chosen, axis=0)
        nearest = np.argsort(np.abs(chosen - median), axis=0, kind="stable")[:beta]
        result = np.take_along_axis(chosen, nearest, axis=0).mean(axis=0)
        return result, {"robust_f": f, "robust_selected": len(selected), "robust_kept": beta}

    def empty_measurements(self) -> dict[str, Any]:
        return {"robust_f": 0, "robust_selected": 0, "robust_kept": 0}

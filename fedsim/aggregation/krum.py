"""``aggregator.kind=krum`` and ``multi_krum`` (Blanchard et al., NeurIPS 2017;
Flower's ``Krum``)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from fedsim.aggregation.robust import (
    RobustAggregator,
    krum_f,
    krum_scores,
    pairwise_sq_distances,
)


class KrumAggregator(RobustAggregator):
    """Krum and Multi-Krum over the n reporting clients' (clipped) updates.

    Each update's score is the sum of its squared L2 distances to its
    ``n - f - 2`` nearest other updates (:func:`fedsim.aggregation.robust.krum_scores`).
    Krum (``multi=False``, ``select=1``) returns the update of lowest score;
    Multi-Krum returns the mean of the ``m`` updates of lowest score, ``m =
    select`` (None: ``n - f``), at most ``n - f``. Scores are computed once;
    ties go to the update first in the canonical order.

    byzantine: f, the Byzantine clients tolerated; a round with n <= 2f + 2
    reporters uses the largest f they allow. Measurements: ``robust_f`` (the f
    used) and ``robust_selected`` (how many updates were averaged).
    """

    def __init__(self, byzantine: Optional[int], select: Optional[int] = 1, *,
                 multi: bool = False, clip: Optional[float] = None) -> None:
        super().__init__(clip)
        if byzantine is None or byzantine < 0:
            raise ValueError(f"byzantine must be an integer >= 0, got {byzantine!r}")
        if select is not None and select < 1:
            raise ValueError(f"select must be an integer >= 1 or None, got {select!r}")
        if not multi and select != 1:
            raise ValueError("Krum selects one update (select=1); use multi=True")
        self.byzantine = int(byzantine)
        self.select = select
        self.kind = "multi_krum" if multi else "krum"

    def selection(self, stack: np.ndarray) -> tuple[np.ndarray, int]:
        """The indices of the selected rows of ``stack`` (lowest score first) and
        the f used."""
        n = stack.shape[0]
        f = krum_f(n, self.byzantine)
        m = min(self.select if self.select is not None else n - f, n - f)
        scores = krum_scores(pairwise_sq_distances(stack), f)
        return np.argsort(scores, kind="stable")[:m], f

    def aggregate(self, stack: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        chosen, f = self.selection(stack)
        return stack[chosen].mean(axis=0), {"robust_f": f, "robust_selected": int(chosen.size)}

    def empty_measurements(self) -> dict[str, Any]:
        return {"robust_f": 0, "robust_selected": 0}

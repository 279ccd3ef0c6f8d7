"""``aggregator.kind=trimmed_mean``: the coordinate-wise trimmed mean (Yin et
al. 2018; Flower's ``FedTrimmedAvg``, scipy's ``trim_mean``)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from fedsim.aggregation.robust import RobustAggregator


class TrimmedMeanAggregator(RobustAggregator):
    """Every coordinate of the aggregate is the mean of that coordinate over the
    n reporting clients after its ``floor(beta * n)`` smallest and as many
    largest values are cut.

    beta: the fraction cut from EACH end, in [0, 0.5) (so at least one value is
    kept). Measurement ``robust_trimmed``: the values cut from each end.
    """

    kind = "trimmed_mean"

    def __init__(self, beta: Optional[float], clip: Optional[float] = None) -> None:
        super().__init__(clip)
        if beta is None or not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def cut(self, n: int) -> int:
        """Values cut from each end of a coordinate among ``n``."""
        return int(self.beta * n)

    def aggregate(self, stack: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        n = stack.shape[0]
        cut = self.cut(n)
        kept = np.sort(stack, axis=0)[cut:n - cut]
        return kept.mean(axis=0), {"robust_trimmed": cut}

    def empty_measurements(self) -> dict[str, Any]:
        return {"robust_trimmed": 0}

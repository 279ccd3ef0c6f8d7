"""``aggregator.kind=median``: the coordinate-wise median (Yin et al. 2018;
Flower's ``FedMedian``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsim.aggregation.robust import RobustAggregator


class MedianAggregator(RobustAggregator):
    """Every coordinate of the aggregate is the median of that coordinate over
    the n reporting clients' (clipped) updates; for even n the mean of the two
    middle values (``np.median``)."""

    kind = "median"

    def aggregate(self, stack: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        return np.median(stack, axis=0), {}

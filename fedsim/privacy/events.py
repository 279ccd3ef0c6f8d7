"""fedsim's own DP events, beside dp-accounting's: every noisy release is one.

dp-accounting's accountants do not know these; :class:`fedsim.privacy.accounting.PrivacyAccountant`
composes them through their RDP curves (:func:`skellam_rdp`, :func:`discrete_gaussian_rdp`).
"""

from __future__ import annotations

import attr
import dp_accounting
import numpy as np


@attr.define(frozen=True)
class DiscreteGaussianDpEvent(dp_accounting.DpEvent):
    """One release of discrete Gaussian noise (:mod:`fedsim.privacy.discrete_gaussian`) of
    ``noise_multiplier`` times the sum's L2 sensitivity (both in integer units),
    composed without sampling amplification."""

    noise_multiplier: float


def discrete_gaussian_rdp(event: DiscreteGaussianDpEvent, orders: np.ndarray) -> np.ndarray:
    """RDP of one release at ``orders``: ``alpha / (2 z^2)`` (inf without noise)."""
    z = float(event.noise_multiplier)
    orders = np.asarray(orders, np.float64)
    if z <= 0:
        return np.full(len(orders), np.inf)
    return orders / (2.0 * z * z)


@attr.define(frozen=True)
class SkellamDpEvent(dp_accounting.DpEvent):
    """One release of the Skellam mechanism: integer-valued sum with L1/L2
    sensitivities ``l1_sensitivity``/``l2_sensitivity`` plus Skellam noise of total
    ``variance`` per coordinate (all in integer units)."""

    l1_sensitivity: float
    l2_sensitivity: float
    variance: float


def skellam_rdp(event: SkellamDpEvent, orders: np.ndarray) -> np.ndarray:
    """RDP of one Skellam release at ``orders`` (inf at non-integer orders, where
    the bound does not apply, and for zero variance)."""
    mu, d1, d2 = event.variance, event.l1_sensitivity, event.l2_sensitivity
    out = np.full(len(orders), np.inf)
    if mu <= 0:
        return out
    for i, a in enumerate(orders):
        if a > 1 and float(a).is_integer():
            out[i] = a * d2 ** 2 / (2 * mu) + min(((2 * a - 1) * d2 ** 2 + 6 * d1) / (4 * mu ** 2),
                                                  3 * d1 / (2 * mu))
    return out

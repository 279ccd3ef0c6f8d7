"""``dp.noise_sampler=discrete_gaussian``: central Gaussian DP with exact
discrete Gaussian noise on the integer sum of secure aggregation.

Under secure aggregation the server decodes an INTEGER sum: every client's
clipped update, scaled by ``scale = 2^precision_bits / C`` and rounded
stochastically to integers (:mod:`fedsim.secure.fixedpoint`). With this sampler the
server adds noise drawn exactly from the discrete Gaussian ``N_Z(0, sigma^2)``
per coordinate (Canonne, Kamath and Steinke, "The Discrete Gaussian for
Differential Privacy", NeurIPS 2020; :mod:`fedsim.privacy.discrete_noise`), with
``sigma = z * C * scale`` in integer units, to that integer sum, and only then
divides by ``scale`` (and by ``clients_per_round``). The release is a function
of ``integer sum + integer noise``, so no floating-point caveat (Mironov 2012)
applies to it.

Privacy: the multivariate discrete Gaussian with integer L2 sensitivity
``Delta`` satisfies ``Delta^2 / (2 sigma^2)``-concentrated DP (CKS20's
multivariate bound), i.e. RDP ``alpha Delta^2 / (2 sigma^2)`` at every order,
the continuous Gaussian's (:func:`fedsim.privacy.events.discrete_gaussian_rdp`).
One client's rounded update has ``Delta = C scale + sqrt(d)``
(:func:`fedsim.privacy.accounting.rounded_sensitivity_event` charges the
``sqrt(d)``),
doubled under replace-one (``sampling=uniform``). The rounds are composed
WITHOUT sampling amplification: dp-accounting's subsampled-Gaussian analyses
use the continuous Gaussian's privacy-loss distribution, which the discrete
one need not share, so only the unamplified RDP is claimed (an upper bound).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Mapping

import numpy as np

from fedsim.aggregation.base import Partial, clip_measurements
from fedsim.privacy.events import DiscreteGaussianDpEvent
from fedsim.privacy.queries import DPQueryAggregator


class DiscreteGaussianAggregator(DPQueryAggregator):
    """``dp=gaussian`` with ``dp.noise_sampler=discrete_gaussian``.

    Clipping (in the workers) is ``dp=gaussian``'s: its query's ``clip_record``
    (TF Privacy's ``preprocess_record``, in numpy).
    The noise is not added by :meth:`finalize`: the server asks
    :meth:`integer_noise` for the round's noise in integer units and adds it to
    the unmasked integer sum before decoding (:meth:`fedsim.engine.server.Server.
    secagg_finish`), so ``finalize`` receives a sum that already carries it and
    only normalizes.
    """

    def integer_noise(self, rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
        """``size`` exact draws (int64) of ``N_Z(0, (z C scale)^2)``: the noise of the
        sum in integer units (``scale`` integer units per 1.0)."""
        from fedsim.privacy.discrete_noise import discrete_gaussian

        sigma = Fraction(self.dp.noise_multiplier) * Fraction(self.dp.l2_norm_clip) \
            * Fraction(scale)
        if sigma == 0:
            return np.zeros(int(size), np.int64)
        return discrete_gaussian(rng, int(size), sigma * sigma)

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        """The already noised sum divided by ``clients_per_round`` (float64, cast
        to float32); the round's :class:`DiscreteGaussianDpEvent`."""
        dp = self.dp
        measurements = clip_measurements(partial, dp.l2_norm_clip, self.noise_std(state),
                                         DiscreteGaussianDpEvent(dp.noise_multiplier))
        result = (np.asarray(partial.total, np.float64) / self.clients_per_round)
        return result.astype(np.float32), dict(state), measurements

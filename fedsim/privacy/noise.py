"""Privacy noise samplers with true tails.

Every noise vector that a privacy guarantee rests on (the server's Gaussian
and Laplace noise, the noise of DP-SGD steps in clients) is drawn here, in
float64, from numpy's ``Generator``:

- Gaussian: ``Generator.standard_normal`` (the ziggurat algorithm, whose tail
  beyond its last layer is sampled exactly by Marsaglia's method, so there is no
  cut-off at a few standard deviations);
- Laplace: ``Generator.laplace`` (inversion of a float64 uniform in (0, 1)).

Both are bounded only by float64's resolution: the ziggurat's tail draws
``x = -log(1 - U1) / r`` and accepts when ``-2 log(1 - U2) > x^2``, both from
53-bit uniforms, so values stop near ``r + sqrt(2 * 53 ln 2) = 12.2``
standard deviations (the Gaussian mass beyond is below 1e-33), and the Laplace
inversion stops near ``53 ln 2 = 36.7`` scales (mass ``e^-36.7``, about
1e-16): deltas far below any delta a run targets, which the README states.

TensorFlow's float32 ``tf.random.normal`` is not used for privacy noise: its
Box-Muller transform clamps the uniform at 1e-7 and never returns a value beyond
``sqrt(-2 ln 1e-7) = 5.678`` standard deviations, which leaves a probability
mass that no accountant sees (a neighbouring release shifted by ``s`` stds
produces outputs beyond the cut-off with probability ``P(g > 5.678 - s)``).

The noise is added to float64 sums and the result is cast afterwards. The
remaining floating-point caveat (Mironov, CCS 2012: the set of floating-point
values a noisy output can take depends on the input, which a continuous-noise
proof ignores) is stated in the README; the Skellam shares of
``dp=distributed_skellam`` are integers (``Generator.poisson``) and have no
such caveat.

Streams: callers pass a ``Generator`` derived from ``(noise seed, purpose,
keys)`` (:func:`fedsim.rng.stream`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

GAUSSIAN_SAMPLER = "numpy-float64-ziggurat"
"""What ``summary.json`` names as the sampler of Gaussian privacy noise."""
LAPLACE_SAMPLER = "numpy-float64-inversion"
"""What ``summary.json`` names as the sampler of Laplace privacy noise."""
SKELLAM_SAMPLER = "numpy-int64-poisson-difference"
"""What ``summary.json`` names as the sampler of Skellam noise shares."""


def adaptive_clip_noise_params(noise_multiplier: float, clients_per_round: float,
                               clipped_count_stddev: float | None) -> tuple[float, float]:
    """TFF's split of the total noise multiplier z between the sum and the count.

    Returns ``(z_sum, clipped_count_stddev)`` with
    ``z_sum = (z^-2 - (2 * clipped_count_stddev)^-2)^-1/2`` and the count's stddev
    defaulting to ``0.05 * clients_per_round`` (0 when z is 0). Raises ValueError,
    as TFF does, when ``z >= 2 * clipped_count_stddev``.
    """
    if noise_multiplier <= 0:
        return 0.0, (0.0 if clipped_count_stddev is None else clipped_count_stddev)
    if clipped_count_stddev is None:
        clipped_count_stddev = 0.05 * clients_per_round
    if noise_multiplier >= 2 * clipped_count_stddev:
        raise ValueError(
            f"clipped_count_stddev = {clipped_count_stddev} (defaults to 0.05 * "
            "`expected_clients_per_round` if not specified) is too low to achieve the "
            f"desired effective `noise_multiplier` ({noise_multiplier}). You must either "
            "increase `clipped_count_stddev` or decrease `noise_multiplier`.")
    z_sum = (noise_multiplier ** -2 - (2 * clipped_count_stddev) ** -2) ** -0.5
    return z_sum, clipped_count_stddev


def gaussian(rng: np.random.Generator, shape: int | Sequence[int], std: float) -> np.ndarray:
    """float64 Gaussian noise of standard deviation ``std`` (>= 0), exact tails."""
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return float(std) * rng.standard_normal(shape, dtype=np.float64)


def laplace(rng: np.random.Generator, shape: int | Sequence[int], scale: float) -> np.ndarray:
    """float64 Laplace noise of scale ``scale`` (>= 0; std ``sqrt(2) * scale``)."""
    if not scale >= 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    if scale == 0:
        return np.zeros(shape, np.float64)
    return rng.laplace(0.0, float(scale), shape)


def add_gaussian(values: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """``values`` (any float dtype) as float64 plus :func:`gaussian` noise; float64."""
    v = np.asarray(values, np.float64)
    return v + gaussian(rng, v.shape, std)

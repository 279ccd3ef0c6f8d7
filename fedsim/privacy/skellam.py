"""Distributed DP: each client adds a share of Skellam noise in the integer
domain before masking, so the server never sees an un-noised sum.

The distributed Skellam mechanism of Agarwal, Kairouz and Liu ("The Skellam
Mechanism for Differentially Private Federated Learning", NeurIPS 2021), the
mechanism TFF's removed ``DistributedDpSumFactory`` defaulted to:

1. the worker clips each client's update to L2 norm C (as ``dp=gaussian``);
2. scales it by ``s = 2^precision_bits / C`` and rounds stochastically to
   integers (each coordinate moves by less than 1);
3. adds Skellam noise ``Poisson(v/2) - Poisson(v/2)`` per coordinate, variance
   ``v = (z * C * s)^2 / clients_per_round``: the sum of independent Skellams
   is Skellam, so the n clients of a round give total variance ``n * v``, which
   is ``(z * C * s)^2`` (central noise of std z * C) when all report;
4. encodes the integers mod 2^b and hands them to secure aggregation.

Sensitivity in integer units, without assuming conditional rounding: rounding
moves a vector by less than sqrt(d) in L2, so one client's vector has
``L2 <= C s + sqrt(d)`` and ``L1 <= sqrt(d) (C s) + d``; replacing a client
(uniform sampling) doubles both. Privacy (RDP, integer orders alpha > 1,
Corollary 3.6 of the paper, with mu the total variance per coordinate)::

    eps(alpha) <= alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2),
                                             3 D1 / (2 mu))

composed over rounds without sampling amplification (an upper bound). The
bound compares cohorts of equal size, each client adding one noise share, so
the config allows this mechanism with ``sampling=uniform`` only (under Poisson
sampling, removing a client would also remove its noise share).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import attr
import numpy as np

from fedsim.aggregation.base import Aggregator, Partial, clip_measurements, zero_invalid
from fedsim.cohort.faults import sample_size
from fedsim.config import DPConfig, SimConfig
from fedsim.privacy.events import SkellamDpEvent
from fedsim.secure.fixedpoint import round_stochastically
from fedsim.secure.protocol import fewest_survivors

TAIL_STDDEVS = 20.0  # modulus headroom for the noise: P(|Skellam| > 20 std) is negligible


def worst_noise_shares(cfg: SimConfig) -> int:
    """The fewest clients' noise shares that the sum of a round that completes
    can hold: the least noise, so the largest epsilon, of any round.

    Clients lost before masking (``faults.client_dropout``, stragglers) take
    their noise share with them; clients lost after masking
    (``secagg.dropout``) do not (their masked input, noise included, is in the
    sum). Without faults before masking every sampled client reports, up to
    ``clients_per_round`` (over-selection); with them, as few as the protocol
    accepts (:func:`fedsim.secure.protocol.fewest_survivors`).
    """
    n = sample_size(cfg.clients_per_round, cfg.faults, cfg.clients)
    if cfg.faults.client_dropout == 0 and cfg.faults.straggler_timeout is None:
        return min(n, cfg.clients_per_round)
    return fewest_survivors(cfg.secagg.protocol, n, cfg.secagg.threshold, cfg.secagg.neighbours)


def scale_for(clip: float, precision_bits: int) -> float:
    """Integer units per 1.0: the rounding step is clip / 2^precision_bits."""
    return 2.0 ** precision_bits / clip


def sensitivities(clip: float, scale: float, dim: int) -> tuple[float, float]:
    """(L1, L2) norm bounds of one client's rounded integer vector."""
    l2 = clip * scale + math.sqrt(dim)
    return math.sqrt(dim) * clip * scale + dim, l2


@attr.define(frozen=True)
class SkellamCodec:
    """Stochastic rounding to integers plus a client's Skellam noise share, mod 2^bits.

    Same interface as :class:`fedsim.secure.fixedpoint.FixedPointCodec` (``bits``,
    ``encode``, ``decode_sum``, ``error_bound``) so it slots into a
    :class:`fedsim.secure.layout.SecureLayout`.
    """

    clip: float
    scale: float
    variance: float  # Skellam variance each client adds, integer units^2
    num_clients: int
    bits: int

    @classmethod
    def for_sum(cls, clip: float, num_clients: int, precision_bits: int,
                variance: float) -> "SkellamCodec":
        scale = scale_for(clip, precision_bits)
        span = num_clients * (clip * scale + 1) + TAIL_STDDEVS * math.sqrt(num_clients * variance)
        bits = math.ceil(math.log2(span + 1)) + 1  # signed range
        if bits > 62:
            raise ValueError(f"distributed Skellam needs {bits} bits for {num_clients} clients; "
                             "lower secagg.precision_bits")
        return cls(clip, scale, variance, num_clients, bits)

    def encode(self, x: np.ndarray, rng: np.random.Generator, dtype: type = np.uint64,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """Clip, scale, round stochastically, add this client's Skellam noise
        share; the integers mod 2^bits as ``dtype`` (uint64, or uint32 when
        bits <= 32), or added into ``add_to`` (as
        :meth:`fedsim.secure.fixedpoint.FixedPointCodec.encode`)."""
        y = np.clip(np.asarray(x, np.float64), -self.clip, self.clip) * self.scale
        units = round_stochastically(y, rng).astype(np.int64)
        if self.variance > 0:
            lam = self.variance / 2.0
            units += rng.poisson(lam, y.shape) - rng.poisson(lam, y.shape)
        enc = units.view(np.uint64) & np.uint64((1 << self.bits) - 1)
        if add_to is None:
            return enc.astype(dtype, copy=False)
        np.add(add_to, enc, out=add_to, casting="unsafe")
        return add_to

    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        t = np.asarray(total, np.uint64) & np.uint64((1 << self.bits) - 1)
        signed = t.astype(np.int64)
        signed[t >= np.uint64(1 << (self.bits - 1))] -= np.int64(1 << self.bits)
        return signed.astype(np.float64) / self.scale

    def error_bound(self, count: int) -> float:
        """Rounding error per coordinate of the sum, noise excluded."""
        return count / self.scale


class SkellamAggregator(Aggregator):
    """``dp=distributed_skellam``: clip in the worker; the noise comes from the
    clients (inside their encoded vectors); the server only normalizes.

    Needs secure aggregation: the clients' noise is added during encoding, so
    ``finalize`` receives the decoded, already noised sum.
    """

    sums_records = True

    def __init__(self, dp: DPConfig, precision_bits: int, clients_per_round: int) -> None:
        self.dp = dp
        self.clients_per_round = int(clients_per_round)
        self.scale = scale_for(dp.l2_norm_clip, precision_bits)
        self.client_variance = (dp.noise_multiplier * dp.l2_norm_clip * self.scale) ** 2 \
            / self.clients_per_round

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"clip": self.dp.l2_norm_clip}

    def current_clip(self, state: Mapping[str, Any]) -> float:
        return self.dp.l2_norm_clip

    def zero_stats(self) -> dict[str, float]:
        return {"clipped": 0.0, "zeroed": 0.0}

    def secure_codec(self, num_clients: int, precision_bits: int) -> "SkellamCodec":
        """Each client adds its Skellam noise share while it encodes its record."""
        return SkellamCodec.for_sum(self.dp.l2_norm_clip, num_clients, precision_bits,
                                    self.client_variance)

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        """One client's record: the update zeroed if non-finite or huge, clipped
        to L2 norm C (its noise share is added when it is encoded)."""
        d, norm, zeroed = zero_invalid(delta, self.dp.zeroing_norm)
        clip = params["clip"]
        clipped = norm > clip
        if clipped:
            d = d * (clip / norm)
        return Partial(d, 1.0, 1, {"clipped": float(clipped), "zeroed": float(zeroed)})

    def event(self, count: int, dim: int) -> SkellamDpEvent:
        """The release of a round whose sum holds ``count`` clients' noise shares
        (add/remove sensitivities; the accountant doubles them for replace-one)."""
        l1, l2 = sensitivities(self.dp.l2_norm_clip, self.scale, dim)
        return SkellamDpEvent(l1, l2, count * self.client_variance)

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        result = (partial.total / self.clients_per_round).astype(np.float32)
        measurements = clip_measurements(
            partial, self.dp.l2_norm_clip,
            math.sqrt(partial.count * self.client_variance) / self.scale / self.clients_per_round,
            self.event(partial.count, partial.total.size))
        return result, dict(state), measurements

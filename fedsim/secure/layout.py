"""Secure aggregation inside a simulated round: what is encoded, and how.

Each virtual client's contribution (its clipped record, as the aggregator's
``accumulate`` produces it: the update plus any extra parts such as the
adaptive clip's unclipped count) is encoded in fixed point
(:mod:`fedsim.secure.fixedpoint`) as one vector in Z_(2^b), masked by the worker on
the client's behalf (:mod:`fedsim.secure.protocol`), and only the unmasked SUM is ever
decoded by the server. Per segment:

- the update: coordinates bounded by the DP clip (an L2 or L1 clip bounds
  every coordinate), or by ``secagg.clip`` without DP (coordinates are
  clipped to [-clip, clip], as Flower's SecAgg+ does);
- each extra part: the adaptive clip's records are +-0.5, bound 0.5.

All segments share one modulus 2^b (the largest any segment needs, so that no
segment's sum can wrap) and each has its own scale. Decoding a sum of n
vectors errs by less than ``n / scale`` per coordinate
(:meth:`SecureLayout.error_bounds`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import attr
import numpy as np

from fedsim.config import SecAggConfig
from fedsim.secure.fixedpoint import FixedPointCodec, word_dtype

EXTRA_BOUND = 0.5  # the quantile estimator's records are below-estimate indicators - 0.5


@dataclass(frozen=True)
class SecureLayout:
    """How one client's record is laid out in Z_(2^bits): segments end to end."""

    codecs: tuple  # FixedPointCodec, or SkellamCodec for a distributed-DP update
    sizes: tuple[int, ...]

    @property
    def bits(self) -> int:
        return self.codecs[0].bits

    @property
    def word_dtype(self) -> type:
        """uint32 when ``bits <= 32``, else uint64 (:func:`fedsim.secure.fixedpoint.word_dtype`)."""
        return word_dtype(self.bits)

    @property
    def vector_len(self) -> int:
        return int(sum(self.sizes))

    def encode(self, parts: Sequence[np.ndarray], rng: np.random.Generator,
               add_to: Optional[np.ndarray] = None) -> np.ndarray:
        """One client's parts -> one vector of :attr:`word_dtype` (stochastic
        rounding from ``rng``); or, with ``add_to`` (a :attr:`word_dtype`
        vector of :attr:`vector_len`), added into it: the input sum that
        :func:`fedsim.secure.protocol.clients_mask_sum` masks."""
        flat = [np.ravel(np.asarray(p, np.float64)) for p in parts]
        if add_to is None:
            return np.concatenate([c.encode(p, rng, dtype=self.word_dtype)
                                   for c, p in zip(self.codecs, flat)])
        start = 0
        for codec, p in zip(self.codecs, flat):
            codec.encode(p, rng, add_to=add_to[start:start + p.size])
            start += p.size
        return add_to

    def decode_sum(self, total: np.ndarray, count: int,
                   update_units: Optional[np.ndarray] = None) -> list[np.ndarray]:
        """The unmasked sum of ``count`` encoded vectors -> the parts' float sums.
        ``update_units``: integers added to the update segment's integer sum
        before it is scaled back (:meth:`FixedPointCodec.decode_sum`)."""
        out, start = [], 0
        for i, (codec, size) in enumerate(zip(self.codecs, self.sizes)):
            part = total[start:start + size]
            out.append(codec.decode_sum(part, count, update_units) if i == 0
                       and update_units is not None else codec.decode_sum(part, count))
            start += size
        return out

    def error_bounds(self, count: int) -> list[float]:
        """Largest decoding error per coordinate of each segment's sum."""
        return [c.error_bound(count) for c in self.codecs]


def make_layout(cfg: SecAggConfig, clip: float, sizes: Sequence[int], num_clients: int,
                update_codec: Any = None) -> SecureLayout:
    """The layout for records of ``sizes`` (update first) summed over ``num_clients``.

    ``update_codec``: the aggregator's own codec for the update segment
    (:meth:`fedsim.aggregation.base.Aggregator.secure_codec`, e.g. the Skellam
    codec that adds each client's noise share); None: plain rounding. The
    modulus is widened to fit every segment and the codec is given it.
    """
    bounds = [float(clip)] + [EXTRA_BOUND] * (len(sizes) - 1)
    n = max(int(num_clients), 1)
    first = update_codec
    bits = cfg.bits
    if bits is None:
        needed = [FixedPointCodec.for_sum(b, n, precision_bits=cfg.precision_bits).bits
                  for b in bounds[1 if first else 0:]]
        bits = max(needed + ([first.bits] if first else []))
    if first is not None:
        if first.bits > bits:
            raise ValueError(f"secagg.bits={bits} is too small for the aggregator's noise "
                             f"({first.bits} bits needed)")
        first = attr.evolve(first, bits=bits)
    codecs = tuple(FixedPointCodec.for_sum(b, n, bits=bits, precision_bits=cfg.precision_bits)
                   for b in bounds[1 if first else 0:])
    return SecureLayout(((first,) if first else ()) + codecs, tuple(int(s) for s in sizes))

"""Fixed-point encoding of real vectors into the ring Z_(2^bits) for secure summation.

Secure aggregation (:mod:`fedsim.secure.protocol`) adds vectors of integers modulo
``2^bits``. To sum real-valued, already clipped client updates with it, each
coordinate is scaled to integer units, rounded stochastically (so the rounding
is unbiased), shifted to be non-negative and reduced modulo ``2^bits``. The
modulus is chosen large enough that the sum of ``num_clients`` encoded vectors
never wraps around, so the modular sum is the exact integer sum and decodes to
the sum of the (rounded) inputs.

Derivation of the range (in the manner of TFF's ``SecureSumFactory``, which
derives the modulus from an upper bound on the summands):

* every client vector has L2 norm ``<= clip``, so every coordinate lies in
  ``[-clip, clip]`` (:meth:`FixedPointCodec.encode` clips coordinates to that
  interval again, which is a no-op for L2-clipped vectors);
* scaled, a coordinate lies in ``[-clip*scale, clip*scale]``; stochastic
  rounding moves it to one of the two nearest integers, so the rounded value
  lies in ``[-offset, offset]`` with ``offset = ceil(clip*scale)``;
* shifted by ``offset``, the encoded value lies in ``[0, 2*offset]``, which we
  bound conservatively by ``[0, 2*offset + 1]``;
* the integer sum of ``n`` encoded values is therefore at most
  ``n * (2*offset + 1)``, and it does not wrap when that is ``< 2^bits``. Hence
  ``bits = ceil(log2(n * (2*offset + 1) + 1))``.

With ``scale = 2^precision_bits / clip`` the rounding step is ``clip /
2^precision_bits``: precision is relative to the clipping norm. The decoded sum
of ``count`` vectors is off by less than ``count / scale`` per coordinate
(each stochastic rounding errs by less than one integer unit, and the errors
have mean zero).

``bits`` is at most 62, so that sums of a few ``uint64`` vectors (as computed
by :mod:`fedsim.secure.protocol`, with wraparound) never overflow before reduction and
every decoded integer fits an ``int64``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsim.errors import FedsimError

MAX_BITS = 62
"""Largest modulus exponent: ``2^62`` keeps every decoded sum inside ``int64``."""


class FixedPointError(FedsimError, ValueError):
    """A fixed-point parameter or input is not allowed (the message names it)."""


def _positive_finite(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(float(value)) and float(value) > 0


def _units_fit(num_clients: int, offset: int, bits: int) -> bool:
    """Whether ``num_clients`` encoded values, each in ``[0, 2*offset+1]``, sum below 2^bits."""
    return num_clients * (2 * offset + 1) < (1 << bits)


def word_dtype(bits: int) -> type:
    """The unsigned dtype that arithmetic modulo ``2^bits`` runs in: ``uint32`` for
    ``bits <= 32`` (``2^bits`` divides ``2^32``, so wraparound is harmless), else ``uint64``."""
    return np.uint32 if bits <= 32 else np.uint64


class UniformWords:
    """Uniform ``uint32`` words from one AES-256-CTR keystream, read in pieces.

    The key (32 bytes) is drawn from ``rng`` once, so the words are
    reproducible from ``rng``'s state, and reading ``n`` words in any number of
    pieces gives the same words. About three times faster than
    ``rng.random(n)`` on these machines (AES-NI), which matters when every
    coordinate of every client update needs one. Each call returns a view of
    one reused buffer (valid until the next call).
    """

    def __init__(self, rng: np.random.Generator, max_words: int) -> None:
        self._enc = Cipher(algorithms.AES(rng.bytes(32)), modes.CTR(bytes(16))).encryptor()
        self._zeros = memoryview(bytes(4 * max_words))
        self._buf = bytearray(4 * max_words + 15)  # update_into wants block_size - 1 spare
        self._max = max_words

    def __call__(self, n: int) -> np.ndarray:
        if not 0 <= n <= self._max:
            raise ValueError(f"UniformWords: {n} words asked, at most {self._max} per call")
        self._enc.update_into(self._zeros[:4 * n], self._buf)
        return np.frombuffer(self._buf, dtype="<u4", count=n)


def _round_with(y: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Stochastic rounding of ``y`` (float64, overwritten) given one uniform
    ``uint32`` word per element; see :func:`round_stochastically`."""
    units = np.floor(y)
    y -= units  # the fractional parts, in [0, 1)
    y *= 2.0 ** 32
    units += words.reshape(y.shape) < y
    return units


def round_stochastically(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each element of ``y`` (float64; overwritten) to one of its two
    neighbouring integers: up with probability ``ceil(frac * 2^32) / 2^32``,
    where ``frac`` is its fractional part, so the rounding is unbiased up to
    ``2^-32`` of a unit. Returns the integers as float64 (same shape). The
    words come from :class:`UniformWords` keyed by ``rng``.
    """
    return _round_with(y, UniformWords(rng, y.size)(y.size))


_CHUNK = 16384
"""Coordinates encoded per pass: the temporaries (128 KiB) stay in the cache and
in malloc's heap (a fresh full-size array per step costs page faults)."""


@dataclass(frozen=True)
class FixedPointCodec:
    """Encodes clipped real vectors as ``uint64`` vectors in ``Z_(2^bits)``.

    clip: bound on every coordinate's absolute value, in the units of the
      vectors (a client vector with L2 norm ``<= clip`` has all coordinates in
      ``[-clip, clip]``).
    num_clients: the largest number of encoded vectors that will be summed; the
      modulus is large enough that their sum never wraps around.
    bits: the modulus is ``2^bits``, ``1 <= bits <= 62``.
    scale: integer units per 1.0 of a coordinate; the rounding step is
      ``1 / scale``.

    Build one with :meth:`for_sum` (which derives ``bits`` or ``scale``); the
    constructor checks that the no-wrap condition
    ``num_clients * (2*ceil(clip*scale) + 1) < 2^bits`` holds and raises
    :class:`FixedPointError` (a ``ValueError``) otherwise.
    """

    clip: float
    num_clients: int
    bits: int
    scale: float

    def __post_init__(self) -> None:
        if not _positive_finite(self.clip):
            raise FixedPointError(f"clip={self.clip}: allowed is a finite number > 0")
        if not isinstance(self.num_clients, (int, np.integer)) or self.num_clients < 1:
            raise FixedPointError(f"num_clients={self.num_clients}: allowed is an integer >= 1")
        if not isinstance(self.bits, (int, np.integer)) or not 1 <= self.bits <= MAX_BITS:
            raise FixedPointError(
                f"bits={self.bits}: allowed is an integer in [1, {MAX_BITS}] (uint64 "
                "arithmetic with wraparound)")
        if not _positive_finite(self.scale):
            raise FixedPointError(f"scale={self.scale}: allowed is a finite number > 0")
        if not _units_fit(self.num_clients, self.offset, self.bits):
            raise FixedPointError(
                f"bits={self.bits} is too small for the sum of num_clients={self.num_clients} "
                f"vectors with clip={self.clip} at scale={self.scale}: it needs "
                f"num_clients * (2*ceil(clip*scale) + 1) = "
                f"{self.num_clients * (2 * self.offset + 1)} < 2^bits = {1 << self.bits}")

    @classmethod
    def for_sum(cls, clip: float, num_clients: int, bits: int | None = None,
                precision_bits: int = 16) -> "FixedPointCodec":
        """The codec for summing ``num_clients`` vectors with coordinates in ``[-clip, clip]``.

        ``scale = 2^precision_bits / clip`` (rounding step ``clip /
        2^precision_bits``). When ``bits`` is None it is the smallest modulus
        exponent with no wraparound, ``ceil(log2(num_clients * (2*offset + 1)
        + 1))`` where ``offset = ceil(clip * scale)``; more than 62 bits raises
        :class:`FixedPointError` (lower ``precision_bits`` or ``num_clients``).

        When ``bits`` is given, ``scale`` is lowered (never raised) until the
        no-wrap condition holds: ``offset <= ((2^bits - 1) // num_clients - 1)
        // 2``. If not even one integer unit per ``clip`` fits (that bound is
        below 1), :class:`FixedPointError` is raised.
        """
        if not isinstance(precision_bits, (int, np.integer)) or not 0 <= precision_bits <= MAX_BITS:
            raise FixedPointError(
                f"precision_bits={precision_bits}: allowed is an integer in [0, {MAX_BITS}]")
        if not _positive_finite(clip):
            raise FixedPointError(f"clip={clip}: allowed is a finite number > 0")
        if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise FixedPointError(f"num_clients={num_clients}: allowed is an integer >= 1")
        clip = float(clip)
        num_clients = int(num_clients)
        scale = 2.0 ** precision_bits / clip
        if bits is None:
            offset = math.ceil(clip * scale)
            needed = (num_clients * (2 * offset + 1)).bit_length()  # == ceil(log2(v + 1))
            if needed > MAX_BITS:
                raise FixedPointError(
                    f"a fixed-point sum of num_clients={num_clients} vectors with "
                    f"precision_bits={precision_bits} needs bits={needed}, more than the "
                    f"{MAX_BITS} that uint64 arithmetic allows; lower precision_bits or "
                    "num_clients")
            return cls(clip=clip, num_clients=num_clients, bits=needed, scale=scale)
        if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
            raise FixedPointError(
                f"bits={bits}: allowed is an integer in [1, {MAX_BITS}] (uint64 arithmetic "
                "with wraparound)")
        bits = int(bits)
        max_offset = (((1 << bits) - 1) // num_clients - 1) // 2
        if max_offset < 1:
            raise FixedPointError(
                f"bits={bits} is too small for the sum of num_clients={num_clients} vectors: "
                f"it needs bits >= {(3 * num_clients).bit_length()} for even one integer "
                "unit per clip")
        if math.ceil(clip * scale) > max_offset:
            scale = max_offset / clip
            while math.ceil(clip * scale) > max_offset:  # float rounding of max_offset / clip
                scale = math.nextafter(scale, 0.0)
        return cls(clip=clip, num_clients=num_clients, bits=bits, scale=scale)

    @property
    def offset(self) -> int:
        """The shift ``ceil(clip * scale)`` that makes every rounded coordinate non-negative."""
        return math.ceil(self.clip * self.scale)

    @property
    def modulus(self) -> int:
        """``2^bits``."""
        return 1 << self.bits

    def encode(self, x: np.ndarray, rng: np.random.Generator, dtype: Any = np.uint64,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """Encode the real vector ``x`` as a vector with values in ``[0, 2^bits)``.

        Coordinates are clipped to ``[-clip, clip]``, scaled by ``scale``,
        rounded stochastically (:func:`round_stochastically`: up with
        probability equal to the fractional part, so the rounding is unbiased),
        shifted by ``offset`` and reduced modulo ``2^bits`` (a no-op: shifted
        values lie in ``[0, 2*offset]``). ``rng`` supplies the rounding
        randomness. ``x`` is not modified.

        dtype: ``np.uint64``, or ``np.uint32`` when ``bits <= 32`` (half the
          memory traffic for secure aggregation's word arithmetic, see
          :func:`word_dtype`).
        add_to: an unsigned array of ``x``'s size: the encoding is added into it
          (wrapping modulo its width, so a ``uint32`` array needs ``bits <=
          32``) and it is returned, instead of a new array. A relay that sums
          many clients' encodings holds only the sum.
        """
        dtype = np.dtype(dtype if add_to is None else add_to.dtype)
        if dtype not in (np.dtype(np.uint64), np.dtype(np.uint32)) or \
                (dtype == np.uint32 and self.bits > 32):
            raise FixedPointError(f"dtype={dtype}: allowed are uint64, and uint32 when bits <= 32 "
                                  f"(bits={self.bits})")
        x = np.asarray(x, dtype=np.float64)
        if add_to is not None and add_to.shape != (x.size,):
            raise FixedPointError(f"add_to has shape {add_to.shape}, expected ({x.size},)")
        if not np.isfinite(x).all():
            raise FixedPointError("cannot encode a vector with NaN or infinite coordinates")
        flat = x.reshape(-1)
        out = np.empty(flat.size, dtype) if add_to is None else add_to
        words = UniformWords(rng, min(flat.size, _CHUNK))
        for start in range(0, flat.size, _CHUNK):
            piece = slice(start, min(start + _CHUNK, flat.size))
            y = np.minimum(flat[piece], self.clip)  # a new array: x is never modified
            np.maximum(y, -self.clip, out=y)
            y *= self.scale
            units = _round_with(y, words(y.size))
            units += self.offset  # exact in float64: |units| < 2^53; now in [0, 2*offset]
            if self.bits <= 31:  # float64 -> int32 is the fast conversion; the values fit
                enc = units.astype(np.int32).view(np.uint32)
            else:
                enc = units.astype(np.uint64)
            if add_to is None:
                out[piece] = enc
            else:
                np.add(out[piece], enc, out=out[piece], casting="unsafe")
        return out if add_to is not None else out.reshape(x.shape)

    def decode_sum(self, s: np.ndarray, count: int,
                   add_units: np.ndarray | None = None) -> np.ndarray:
        """Decode the modular sum ``s`` of ``count`` encoded vectors to a ``float64`` vector.

        ``(s - count*offset) mod 2^bits`` is read as a signed integer in
        ``[-2^(bits-1), 2^(bits-1))`` and divided by ``scale``. Exact (up to
        float64 rounding) as long as ``0 <= count <= num_clients``; larger
        counts could have wrapped and raise :class:`FixedPointError`.
        ``add_units``: integers (int64) added to the signed integer sum before
        the division (e.g. exact discrete noise, :mod:`fedsim.privacy.discrete_gaussian`).
        """
        if not isinstance(count, (int, np.integer)) or not 0 <= count <= self.num_clients:
            raise FixedPointError(
                f"count={count}: allowed is an integer in [0, num_clients={self.num_clients}] "
                "(a sum of more vectors may have wrapped around)")
        s = np.asarray(s)
        if s.dtype.kind not in "ui":
            raise FixedPointError(f"decode_sum needs an integer array, got dtype {s.dtype}")
        mask = np.uint64(self.modulus - 1)
        shift = np.uint64((int(count) * self.offset) % self.modulus)
        d = (s.astype(np.uint64) - shift) & mask  # uint64 arithmetic wraps modulo 2^64
        signed = d.astype(np.int64)
        signed[d >= np.uint64(self.modulus >> 1)] -= np.int64(self.modulus)
        if add_units is not None:
            signed += np.asarray(add_units, np.int64)
        return signed.astype(np.float64) / self.scale

    def error_bound(self, count: int) -> float:
        """Bound on the absolute error per coordinate of a decoded sum of ``count`` vectors.

        ``count / scale``, in the units of the vectors: each stochastic rounding
        errs by less than one integer unit. Relative to the clipped inputs
        (coordinates outside ``[-clip, clip]`` are clipped before encoding).
        """
        return count / self.scale

"""Secure aggregation: Bonawitz et al.'s protocol (CCS 2017) and SecAgg+ (Bell et al., CCS 2020).

The server learns the sum modulo ``2^bits`` of the clients' ``uint64`` input
vectors (encode real vectors with :mod:`fedsim.secure.fixedpoint`) and nothing else
about an individual input, even when some clients drop out mid-protocol.

Rounds and messages
===================

Client-side steps are vectorized functions over many virtual clients (so that a
worker process can run all of its clients in one call); the server side is a
:class:`SecAggServer` with one method per round. Messages are frozen
dataclasses (picklable: ints, bytes, ``uint64`` arrays).

=====  ==========================  ======================  =================================
round  client step                 client -> server        server step -> clients
=====  ==========================  ======================  =================================
0      ``clients_advertise``       ``AdvertiseKeys``       ``receive_keys`` ->
                                                           ``NeighbourKeys``
1      ``clients_share_keys``      ``EncryptedShares``     ``route_shares`` ->
                                                           ``SharesDelivery``
2      ``clients_mask``            ``MaskedInput``         ``collect_masked`` ->
                                                           ``UnmaskRequest``
3      ``clients_unmask``          ``UnmaskResponse``      ``unmask`` -> the sum
=====  ==========================  ======================  =================================

* Round 0: client ``i`` makes two X25519 key pairs, ``(c_sk, c_pk)`` to encrypt
  shares and ``(s_sk, s_pk)`` to agree pairwise masks, and advertises the public
  keys. The server picks the neighbour graph ``N`` and sends each client its
  neighbours' public keys and the round's ``bits``, ``vector_len`` and
  threshold ``t``.
* Round 1: client ``i`` draws a self-mask seed ``b_i`` (32 bytes) and splits
  ``b_i`` and ``s_sk_i`` into Shamir shares, ``t`` of the ``m = |N(i)| + 1``
  holders (its neighbours and itself) being needed to recover either. The share
  for neighbour ``j`` is encrypted with AES-256-GCM under
  ``HKDF-SHA256(X25519(c_sk_i, c_pk_j))``; the plaintext carries ``(i, j)`` and
  the associated data binds them too. The server routes the ciphertexts.
* Round 2: client ``i`` decrypts and checks the shares it received, then sends
  ``y_i = x_i + PRG(b_i) + sum_{j in N(i), i<j} PRG(s_ij) - sum_{j in N(i), i>j}
  PRG(s_ij) mod 2^bits`` with ``s_ij = HKDF-SHA256(X25519(s_sk_i, s_pk_j))``,
  over the neighbours ``j`` that took part in round 1.
* Round 3: the server tells each surviving client which of its neighbours
  survived (sent ``y``) and which dropped; the client reveals its share of
  ``b_i`` for each survivor and of ``s_sk_i`` for each dropped neighbour, never
  both for the same ``i``. The server reconstructs them from ``t`` shares each,
  removes the survivors' self masks and the masks that survivors shared with
  dropped clients, and obtains ``sum_{i survived} x_i mod 2^bits``.

Design choices
==============

* **Neighbour graph.** ``secagg``: the complete graph over the round's ``n``
  clients. ``secagg_plus``: the Harary graph ``H(k, n)`` (each client linked to
  the ``k/2`` clients on either side of it on a ring) over a random permutation
  of the clients drawn by the server from ``graph_seed``; it is symmetric,
  ``k``-regular and ``k``-connected. Default ``k = 2*ceil(log2(n))`` (even; 14
  for n = 100, 16 for n = 200), :func:`default_neighbours`; when ``k >= n - 1``
  the graph is complete. Bell et al. show ``k = O(log n)`` suffices, with
  constants that depend on the tolerated fractions of corrupt and dropped
  clients; this default is a simulation-scale choice, configurable with
  ``neighbours``.
* **Threshold.** ``t = floor(m/2) + 1`` where ``m = |N(i)| + 1`` is the number
  of share holders per client (``m = n`` for ``secagg``, which gives Bonawitz et
  al.'s ``floor(n/2) + 1``; ``m = k + 1`` for ``secagg_plus``),
  :func:`default_threshold`. Because an honest client reveals at most one of
  the two shares of each peer, a server would need ``2t`` distinct holders to
  learn both ``b_i`` and ``s_sk_i`` (hence ``x_i``), but there are only ``m <
  2t``: impossible without corrupted clients, even if the server lies about
  who dropped. Up to ``m - t`` holders may drop per neighbourhood (``n - t``
  clients in all for ``secagg``). Configurable with ``threshold`` (``2 <= t <=
  m``); the active-adversary setting with corrupted clients needs larger ``t``
  and the signed consistency round of Bonawitz et al., which this simulation
  (honest-but-curious server) omits.
* **Secret sharing.** Shamir over the prime field ``GF(2^521 - 1)`` (a Mersenne
  prime, larger than the 256-bit secrets), holder ``j`` at the point
  ``x = j + 1``; coefficients are uniform field elements (rejection sampled).
* **PRG.** The AES-256-CTR keystream (counter block 0) under the 32-byte seed,
  read as little-endian words of 32 bits when ``bits <= 32`` and of 64 bits
  otherwise: ``d`` coordinates take ``4d`` or ``8d`` bytes of keystream,
  generated and summed in place without Python loops over coordinates. Sums
  are taken modulo ``2^32`` or ``2^64`` (``uint32``/``uint64`` wraparound,
  :func:`fedsim.secure.fixedpoint.word_dtype`) and reduced modulo ``2^bits`` at the
  end, which equals summing the masked-to-``bits`` words since ``2^bits``
  divides the word modulus. Messages carry ``uint64`` vectors.
* **Relays.** A worker that masks for many virtual clients sends one
  :class:`MaskedSum` (:func:`clients_mask_sum`); the pairwise masks between
  two of its own clients cancel in that sum and are skipped, so the server's
  view is unchanged and the simulation spends less time than the clients
  would.
* **Randomness.** ``rng=None`` draws keys, seeds, coefficients and nonces from
  ``os.urandom``. For reproducible simulations pass an ``int`` (each client
  then uses its own stream derived from ``(seed, client id)``, independent of
  how clients are split between workers) or a ``numpy`` ``Generator`` (child
  streams are spawned in client-id order). Seeded runs are *not*
  cryptographically secure.
* **Cost.** Per client: ``O(k)`` key agreements, encryptions and PRG
  expansions, and ``O(k * t)`` field operations for the shares (a relay that
  sums many clients' inputs skips the cancelling masks, see "Relays").

Errors: :class:`SecAggAbort` (a :class:`~fedsim.errors.FedsimError`) when the
protocol must stop and the round's update is discarded (too few shares to
unmask, a tampered ciphertext, a refused request); :class:`SecAggError` (also a
``ValueError``) for parameters or inputs that are not allowed, or steps called
out of order.
"""

from __future__ import annotations

import copy
import hmac
import math
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedsim.errors import FedsimError
from fedsim.secure.fixedpoint import word_dtype

PROTOCOLS = ("secagg", "secagg_plus")
"""The protocols :class:`SecAggServer` runs."""

PRIME = (1 << 521) - 1
"""The Mersenne prime ``2^521 - 1``: Shamir shares are elements of ``GF(PRIME)``."""

MAX_CLIENT_ID = (1 << 63) - 1
"""Client ids are integers in ``[0, MAX_CLIENT_ID]``."""

_KEY_BYTES = 32  # X25519 keys, self-mask seeds, pairwise seeds, AES-256 keys
_SHARE_BYTES = 66  # one element of GF(2^521 - 1)
_NONCE_BYTES = 12  # AES-GCM nonce
_IDS = struct.Struct(">QQ")  # (sender, receiver)
_PLAINTEXT_BYTES = _IDS.size + 2 * _SHARE_BYTES
_INFO_SHARE_KEY = b"fedsim-secagg/v1 share encryption key"
_INFO_MASK_SEED = b"fedsim-secagg/v1 pairwise mask seed"
_AD_PREFIX = b"fedsim-secagg/v1 shares"
_HKDF_ZERO_SALT = bytes(32)  # HKDF's default salt: HashLen zero bytes


class SecAggError(FedsimError, ValueError):
    """A secure-aggregation parameter or input is not allowed, or a step came out of order."""


class SecAggAbort(FedsimError):
    """The protocol stopped: the round's aggregate cannot be (safely) computed and is discarded.

    The message says in which round and why, e.g. ``secure aggregation aborted
    in round 3: only 4 of the t=6 shares needed to recover client 7 are
    available; the round's update is discarded``.
    """


def _abort(round_: int, what: str) -> SecAggAbort:
    return SecAggAbort(
        f"secure aggregation aborted in round {round_}: {what}; the round's update is discarded")


def _too_few_shares(round_: int, have: int, t: int, client: int) -> SecAggAbort:
    return _abort(round_, f"only {have} of the t={t} shares needed to recover client {client} "
                          "are available")


# --------------------------------------------------------------------------- randomness

RngLike = np.random.Generator | int | None


def _client_rngs(ids: Sequence[int], rng: RngLike) -> dict[int, np.random.Generator | None]:
    """One random stream per client (None: the OS's CSPRNG); see the module's "Randomness"."""
    if rng is None:
        return {i: None for i in ids}
    if isinstance(rng, np.random.Generator):
        return dict(zip(ids, rng.spawn(len(ids))))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return {i: np.random.default_rng(np.random.SeedSequence(int(rng), spawn_key=(i,)))
                for i in ids}
    raise SecAggError(f"rng={rng!r}: allowed is None, an int seed or a numpy Generator")


def _randbytes(rng: np.random.Generator | None, n: int) -> bytes:
    return os.urandom(n) if rng is None else rng.bytes(n)


class _ByteSource:
    """``randbytes(n)`` for one client: ``os.urandom`` (rng None), or its seeded
    stream read in chunks of ``chunk`` bytes (``Generator.bytes`` costs ~15 us a
    call whatever ``n``, and a client's round 1 needs dozens of small draws)."""

    def __init__(self, rng: np.random.Generator | None, chunk: int = 2048) -> None:
        self._rng, self._chunk = rng, chunk
        self._buf, self._pos = b"", 0

    def __call__(self, n: int) -> bytes:
        if self._rng is None:
            return os.urandom(n)
        if self._pos + n > len(self._buf):
            self._buf = self._buf[self._pos:] + self._rng.bytes(max(n, self._chunk))
            self._pos = 0
        self._pos += n
        return self._buf[self._pos - n:self._pos]


# --------------------------------------------------------------------------- Shamir

def _field_element(randbytes: Callable[[int], bytes]) -> int:
    """A uniform element of GF(PRIME) (rejection sampling of 521-bit integers)."""
    while True:
        v = int.from_bytes(randbytes(_SHARE_BYTES), "big") & PRIME
        if v != PRIME:
            return v


def shamir_split(secret: int, threshold: int, xs: Sequence[int],
                 randbytes: Callable[[int], bytes]) -> list[int]:
    """Shamir shares of ``secret`` in GF(2^521 - 1): the values at ``xs`` of a random
    polynomial of degree ``threshold - 1`` whose constant term is ``secret``.

    Any ``threshold`` of the shares determine ``secret``; fewer reveal nothing
    about it. ``xs`` are distinct non-zero field elements; ``randbytes(n)``
    returns ``n`` random bytes.
    """
    if not 0 <= secret < PRIME:
        raise SecAggError("a Shamir secret must lie in [0, 2^521 - 1)")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold={threshold}: allowed is an integer in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("Shamir evaluation points must be distinct and non-zero")
    coeffs = [secret] + [_field_element(randbytes) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % PRIME
        shares.append(acc)
    return shares


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The coefficients ``l_j = prod_{m != j} x_m / (x_m - x_j)`` (mod PRIME).

    The evaluation points are client ids + 1, so each denominator is a product
    of small differences: inverting it is cheap (a batch inversion of full-size
    field elements would cost more)."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def shamir_reconstruct(points: Sequence[tuple[int, int]]) -> int:
    """The secret (the polynomial's value at 0) from ``(x, share)`` points.

    Uses all the points given; pass exactly ``threshold`` of them.
    """
    xs = tuple(x for x, _ in points)
    if len(set(xs)) != len(xs) or not xs or any(not 0 < x < PRIME for x in xs):
        raise SecAggError("Shamir reconstruction needs distinct, non-zero evaluation points")
    coeffs = _lagrange_at_zero(xs)
    return sum(c * y for c, (_, y) in zip(coeffs, points)) % PRIME


# --------------------------------------------------------------------------- primitives

def _hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``ikm`` with no salt (``HashLen`` zero bytes) and
    ``info``, 32 bytes of output: ``HMAC(HMAC(0^32, ikm), info || 0x01)``.

    The same bytes as ``cryptography``'s ``HKDF(SHA256(), 32, salt=None,
    info)`` (a test checks it), with two one-shot C HMAC calls instead of the
    objects that one derivation there builds (a client derives one key per
    neighbour and round)."""
    prk = hmac.digest(_HKDF_ZERO_SALT, ikm, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


def _agree(sk: bytes | X25519PrivateKey, pk_raw: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(X25519(sk, pk)) -> 32 bytes. ValueError for an invalid public key.

    ``sk`` may be the raw private key or an already loaded one (loading costs
    as much as the exchange, so loops over neighbours load it once)."""
    if isinstance(sk, bytes):
        sk = X25519PrivateKey.from_private_bytes(sk)
    return _hkdf_sha256(sk.exchange(X25519PublicKey.from_public_bytes(pk_raw)), info)


def _public(sk_raw: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(sk_raw).public_key().public_bytes_raw()


class _Keystream:
    """AES-256-CTR keystreams of ``length`` words, written into one reused buffer.

    Words are 32 bits when ``bits <= 32`` (half the AES work; the masks are
    reduced mod 2^bits anyway, so they stay uniform) and 64 bits otherwise.
    """

    def __init__(self, length: int, bits: int = 64) -> None:
        width = 4 if bits <= 32 else 8
        nbytes = width * length
        self._zeros = bytes(nbytes)
        self._buf = bytearray(nbytes + 15)  # update_into wants block_size - 1 spare bytes
        self.words = np.frombuffer(self._buf, dtype=f"<u{width}", count=length)

    def fill(self, seed: bytes) -> np.ndarray:
        """The keystream under ``seed`` as words (a view, overwritten by later fills)."""
        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        enc.update_into(self._zeros, self._buf)
        return self.words

    def add(self, y: np.ndarray, seed: bytes, subtract: bool = False) -> None:
        """``y += PRG(seed)`` (or ``-=``) in place, modulo 2^32 or 2^64 (``y``'s dtype;
        fastest when it is :attr:`words`' dtype, :func:`fedsim.secure.fixedpoint.word_dtype`)."""
        if subtract:
            np.subtract(y, self.fill(seed), out=y)
        else:
            np.add(y, self.fill(seed), out=y)


def prg(seed: bytes, length: int, bits: int = 64) -> np.ndarray:
    """The mask ``PRG(seed)``: ``length`` uint64 words of AES-256-CTR keystream under ``seed``.

    Masks are added modulo 2^64 and the result reduced modulo ``2^bits``
    (equivalently, ``PRG(seed) & (2^bits - 1)`` is the mask in ``Z_(2^bits)``).
    """
    return _Keystream(length, bits).fill(seed).astype(np.uint64)


def _mask_of(bits: int, dtype: Any = np.uint64) -> Any:
    """``2^bits - 1`` as a scalar of ``dtype`` (all ones when ``bits`` exceeds its width)."""
    dt = np.dtype(dtype)
    return dt.type(min((1 << bits) - 1, int(np.iinfo(dt).max)))


# --------------------------------------------------------------------------- graphs

def default_neighbours(n: int) -> int:
    """SecAgg+'s default neighbourhood size ``k = 2*ceil(log2(n))`` (even), capped at ``n - 1``."""
    if n <= 1:
        return 0
    return min(2 * math.ceil(math.log2(n)), n - 1)


def default_threshold(m: int) -> int:
    """The default threshold ``floor(m/2) + 1`` for ``m`` share holders (neighbours plus self)."""
    return m // 2 + 1


def fewest_survivors(protocol: str, n: int, threshold: int | None = None,
                     neighbours: int | None = None) -> int:
    """The fewest masked inputs with which a round of ``n`` clients can still
    complete. Unmasking needs each survivor's self-mask seed from ``t`` holders
    among its neighbours and itself, and only survivors answer, so at least
    ``t`` clients must have sent a masked input (``t`` and the neighbourhood
    size as :meth:`SecAggServer.receive_keys` picks them)."""
    if protocol == "secagg":
        m = n
    else:
        k = neighbours if neighbours is not None else default_neighbours(n)
        m = min(k, n - 1) + 1
    t = threshold if threshold is not None else default_threshold(m)
    return max(1, min(t, n))


def harary_graph(ids: Sequence[int], k: int, rng: np.random.Generator) -> dict[int, frozenset[int]]:
    """The Harary graph ``H(k, n)`` over a random permutation of ``ids``.

    Clients sit on a ring in a random order (from ``rng``), each linked to the
    ``k/2`` clients on either side: a symmetric, ``k``-regular, ``k``-connected
    graph. ``k`` must be even; ``k >= n - 1`` gives the complete graph.
    """
    ids = sorted(int(i) for i in ids)
    n = len(ids)
    if k >= n - 1:
        return {i: frozenset(j for j in ids if j != i) for i in ids}
    if k < 2 or k % 2:
        raise SecAggError(f"neighbours={k}: allowed is an even integer >= 2")
    ring = _ring(ids, rng)
    half = k // 2
    return {ring[p]: frozenset(ring[(p + d) % n] for d in range(-half, half + 1) if d)
            for p in range(n)}


def _ring(sorted_ids: Sequence[int], rng: np.random.Generator) -> list[int]:
    """The Harary graph's ring: a random permutation (from ``rng``) of the sorted ids."""
    return [sorted_ids[p] for p in rng.permutation(len(sorted_ids))]


def complete_graph(ids: Sequence[int]) -> dict[int, frozenset[int]]:
    """Every client is every other client's neighbour (the original SecAgg)."""
    ids = sorted(int(i) for i in ids)
    return {i: frozenset(j for j in ids if j != i) for i in ids}


# --------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client -> server: the client's two X25519 public keys (32 raw bytes each).

    c_pk: for agreeing the keys that encrypt the client's shares.
    s_pk: for agreeing the pairwise mask seeds.
    """

    client_id: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class NeighbourKeys:
    """Round 0, server -> client: the round's parameters and the neighbours' public keys.

    bits: inputs and sums live in ``Z_(2^bits)``.
    vector_len: the number of coordinates of every input.
    threshold: ``t``, the number of shares needed to recover a secret.
    keys: neighbour id -> ``(c_pk, s_pk)``.
    """

    client_id: int
    bits: int
    vector_len: int
    threshold: int
    keys: Mapping[int, tuple[bytes, bytes]]


@dataclass(frozen=True)
class EncryptedShares:
    """Round 1, client -> server: one ciphertext per neighbour (receiver id -> ``nonce || GCM``).

    Each ciphertext holds ``(sender, receiver, share of s_sk, share of b)``.
    """

    sender: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class SharesDelivery:
    """Round 1, server -> client: the ciphertexts addressed to ``receiver`` (sender id -> bytes).

    The senders are the receiver's neighbours that took part in round 1; the
    receiver masks with exactly those.
    """

    receiver: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client -> server: ``y`` = the input plus masks, ``uint64`` in ``[0, 2^bits)``."""

    sender: int
    y: np.ndarray


@dataclass(frozen=True)
class MaskedSum:
    """Round 2, relay -> server: the sum mod ``2^bits`` of several clients' masked
    inputs, with their ids. A worker that acts for many virtual clients sends
    one of these instead of one :class:`MaskedInput` each; the server learns
    nothing more (it would add them up itself), and the traffic shrinks by the
    number of clients per worker."""

    senders: frozenset
    y: np.ndarray


def sum_masked(msgs: Sequence[MaskedInput], bits: int) -> MaskedSum:
    """Add masked inputs mod ``2^bits`` into one :class:`MaskedSum`."""
    if not msgs:
        raise SecAggError("sum_masked: no masked inputs")
    total = np.zeros_like(np.asarray(msgs[0].y), dtype=np.uint64)
    senders = set()
    for m in msgs:
        if m.sender in senders:
            raise SecAggError(f"sum_masked: repeated masked input from client {m.sender}")
        np.add(total, np.asarray(m.y, np.uint64), out=total)
        senders.add(m.sender)
    if bits < 64:
        total &= _mask_of(bits)
    return MaskedSum(frozenset(senders), total)


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3, server -> client: which of the receiver's neighbours survived and which dropped.

    survivors: clients (the receiver included) whose masked input arrived; the
      receiver reveals its share of their self-mask seeds ``b``.
    dropped: neighbours that took part in round 1 but sent no masked input; the
      receiver reveals its share of their mask keys ``s_sk``.
    """

    receiver: int
    survivors: frozenset[int]
    dropped: frozenset[int]


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, client -> server: Shamir shares (owner id -> field element), the x-coordinate
    being ``sender + 1``.

    b_shares: shares of the survivors' self-mask seeds.
    sk_shares: shares of the dropped clients' mask keys.
    """

    sender: int
    b_shares: Mapping[int, int]
    sk_shares: Mapping[int, int]


@dataclass
class ClientState:
    """One client's secrets and progress; the client steps update it in place.

    stage: the last round the client completed (0 once its keys are made; then
      1, 2, 3).
    shares: owner id -> ``(share of s_sk_owner, share of b_owner)`` held by this
      client, its own shares included.
    revealed_b, revealed_sk: owners whose ``b`` / ``s_sk`` share this client has
      revealed (it never reveals both for one owner).
    """

    client_id: int
    c_sk: bytes = field(repr=False)
    s_sk: bytes = field(repr=False)
    c_pk: bytes
    s_pk: bytes
    rng: np.random.Generator | None = field(default=None, repr=False)
    stage: int = 0
    bits: int = 0
    vector_len: int = 0
    threshold: int = 0
    neighbour_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    b_seed: bytes | None = field(default=None, repr=False)
    shares: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    mask_peers: frozenset[int] = frozenset()
    revealed_b: set[int] = field(default_factory=set)
    revealed_sk: set[int] = field(default_factory=set)
    # neighbour -> the AES-GCM key of round 1 (ECDH is symmetric: the same key
    # decrypts the neighbour's shares in round 2, so it is derived once)
    share_keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    # c_sk and s_sk loaded once, as a client keeps the key pairs it made
    # (loading a raw X25519 key costs a scalar multiplication: it derives the
    # public key)
    c_key: X25519PrivateKey | None = field(default=None, repr=False, compare=False)
    s_key: X25519PrivateKey | None = field(default=None, repr=False, compare=False)

    def c_private(self) -> X25519PrivateKey:
        """``c_sk``, loaded (once)."""
        if self.c_key is None:
            self.c_key = X25519PrivateKey.from_private_bytes(self.c_sk)
        return self.c_key

    def s_private(self) -> X25519PrivateKey:
        """``s_sk``, loaded (once)."""
        if self.s_key is None:
            self.s_key = X25519PrivateKey.from_private_bytes(self.s_sk)
        return self.s_key


# --------------------------------------------------------------------------- clients

def _check_id(i: object) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i <= MAX_CLIENT_ID:
        raise SecAggError(f"client id {i!r}: allowed is an integer in [0, 2^63 - 1]")
    return int(i)


def _state(states: Mapping[int, ClientState], cid: int, stage: int, step: str) -> ClientState:
    try:
        st = states[cid]
    except KeyError:
        raise SecAggError(f"{step}: no state for client {cid}") from None
    if st.stage != stage:
        raise SecAggError(f"{step}: client {cid} is at stage {st.stage}, expected {stage}")
    return st


def _ad(sender: int, receiver: int) -> bytes:
    return _AD_PREFIX + _IDS.pack(sender, receiver)


def clients_advertise(ids: Iterable[int], rng: RngLike = None
                      ) -> tuple[dict[int, ClientState], list[AdvertiseKeys]]:
    """Round 0 for the clients ``ids``: make each one's two X25519 key pairs.

    Returns the clients' states (keep them with the clients) and their
    :class:`AdvertiseKeys` messages for :meth:`SecAggServer.receive_keys`.
    ``rng``: see the module's "Randomness" (None: ``os.urandom``).
    """
    ids = [_check_id(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise SecAggError("clients_advertise: client ids must be distinct")
    ids.sort()
    states: dict[int, ClientState] = {}
    msgs = []
    for cid, crng in _client_rngs(ids, rng).items():
        both = _randbytes(crng, 2 * _KEY_BYTES)
        c_sk, s_sk = both[:_KEY_BYTES], both[_KEY_BYTES:]
        c_key = X25519PrivateKey.from_private_bytes(c_sk)
        s_key = X25519PrivateKey.from_private_bytes(s_sk)
        st = ClientState(client_id=cid, c_sk=c_sk, s_sk=s_sk,
                         c_pk=c_key.public_key().public_bytes_raw(),
                         s_pk=s_key.public_key().public_bytes_raw(), rng=crng,
                         c_key=c_key, s_key=s_key)
        states[cid] = st
        msgs.append(AdvertiseKeys(cid, st.c_pk, st.s_pk))
    return states, msgs


def clients_share_keys(states: Mapping[int, ClientState],
                       setups: Mapping[int, NeighbourKeys],
                       share_pair_keys: bool = True) -> list[EncryptedShares]:
    """Round 1 for the clients in ``setups``: secret-share ``b_i`` and ``s_sk_i``, encrypt shares.

    Each client draws its self-mask seed ``b_i``, splits ``b_i`` and ``s_sk_i``
    into ``t``-of-``(|N(i)| + 1)`` Shamir shares (keeping its own), and
    encrypts each neighbour's pair of shares with AES-256-GCM under
    ``HKDF(X25519(c_sk_i, c_pk_j))``. Returns one :class:`EncryptedShares` per
    client for :meth:`SecAggServer.route_shares`.

    share_pair_keys: ECDH is symmetric, so when two clients of this call see
      each other's genuine ``c_pk``, ``X25519(c_sk_i, c_pk_j) ==
      X25519(c_sk_j, c_pk_i)`` and the pair's key is derived once (the same
      bytes either way: a saving of the simulation's CPU time only). False:
      every client derives each of its keys itself, as a deployed client
      would (the protocol's full client-side cost).
    """
    out = []
    genuine = ({cid: states[cid].c_pk for cid in setups if cid in states}
               if share_pair_keys else {})
    pair_keys: dict[tuple[int, int], bytes] = {}
    for cid in sorted(setups):
        setup = setups[cid]
        st = _state(states, cid, 0, "clients_share_keys")
        if setup.client_id != cid or cid in setup.keys:
            raise SecAggError(f"clients_share_keys: the setup for client {cid} is not addressed "
                              "to it or lists it as its own neighbour")
        neighbours = sorted(setup.keys)
        holders = neighbours + [cid]
        if not 1 <= setup.threshold <= len(holders):
            raise _abort(1, f"client {cid} was given threshold t={setup.threshold} for "
                            f"{len(holders)} share holders")
        st.bits, st.vector_len, st.threshold = setup.bits, setup.vector_len, setup.threshold
        st.neighbour_keys = dict(setup.keys)

        randbytes = _ByteSource(st.rng)
        st.b_seed = randbytes(_KEY_BYTES)
        xs = [h + 1 for h in holders]
        sk_shares = shamir_split(int.from_bytes(st.s_sk, "big"), st.threshold, xs, randbytes)
        b_shares = shamir_split(int.from_bytes(st.b_seed, "big"), st.threshold, xs, randbytes)
        st.shares = {cid: (sk_shares[-1], b_shares[-1])}
        ciphertexts = {}
        c_key = st.c_private()
        for j, sk_share, b_share in zip(neighbours, sk_shares, b_shares):
            pk, pair = setup.keys[j][0], (min(cid, j), max(cid, j))
            key = pair_keys.get(pair) if genuine.get(j) == pk else None
            if key is None:
                try:
                    key = _agree(c_key, pk, _INFO_SHARE_KEY)
                except ValueError:
                    raise _abort(1, f"client {j} advertised an invalid public key") from None
                if genuine.get(j) == pk:
                    pair_keys[pair] = key
            st.share_keys[j] = key
            nonce = randbytes(_NONCE_BYTES)
            plaintext = (_IDS.pack(cid, j) + sk_share.to_bytes(_SHARE_BYTES, "big")
                         + b_share.to_bytes(_SHARE_BYTES, "big"))
            ciphertexts[j] = nonce + AESGCM(key).encrypt(nonce, plaintext, _ad(cid, j))
        st.stage = 1
        out.append(EncryptedShares(cid, ciphertexts))
    return out


def _receive_shares(st: ClientState, delivery: SharesDelivery) -> None:
    """Decrypt and check the shares addressed to ``st``'s client; store them in ``st.shares``."""
    cid = st.client_id
    for sender in sorted(delivery.ciphertexts):
        blob = delivery.ciphertexts[sender]
        if sender not in st.neighbour_keys:
            raise _abort(2, f"client {cid} received shares from client {sender}, which is not "
                            "its neighbour")
        try:
            key = st.share_keys.get(sender) or _agree(st.c_private(),
                                                      st.neighbour_keys[sender][0],
                                                      _INFO_SHARE_KEY)
            plaintext = AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:],
                                            _ad(sender, cid))
        except (InvalidTag, ValueError):
            raise _abort(2, f"client {cid} could not authenticate the share ciphertext from "
                            f"client {sender} (tampered, corrupted or misrouted)") from None
        if len(plaintext) != _PLAINTEXT_BYTES or _IDS.unpack_from(plaintext) != (sender, cid):
            raise _abort(2, f"the shares from client {sender} to client {cid} carry other "
                            "client ids")
        sk_share = int.from_bytes(plaintext[_IDS.size:_IDS.size + _SHARE_BYTES], "big")
        b_share = int.from_bytes(plaintext[_IDS.size + _SHARE_BYTES:], "big")
        st.shares[sender] = (sk_share, b_share)
    st.mask_peers = frozenset(delivery.ciphertexts)


def _check_input(x: object, bits: int, vector_len: int, who: str) -> np.ndarray:
    """The input as a fresh vector of ``word_dtype(bits)``, after checking its shape and
    range."""
    x = np.asarray(x)
    if x.shape != (vector_len,):
        raise SecAggError(f"{who}: the input has shape {x.shape}, expected ({vector_len},)")
    if x.dtype.kind not in "ui":
        raise SecAggError(f"{who}: the input has dtype {x.dtype}; allowed are integer dtypes "
                          "(encode real vectors with fedsim.secure.fixedpoint)")
    if x.dtype.kind == "i" and x.size and x.min() < 0:
        raise SecAggError(f"{who}: the input has negative values; allowed is [0, 2^{bits})")
    if bits < 64 and x.size and int(x.max()) >> bits:
        raise SecAggError(f"{who}: the input has values >= 2^{bits}")
    return x.astype(word_dtype(bits))


def _begin_masking(states: Mapping[int, ClientState], deliveries: Mapping[int, SharesDelivery],
                   cid: int, step: str) -> ClientState:
    """Check that client ``cid`` may mask now; decrypt and check the shares delivered to it."""
    st = _state(states, cid, 1, step)
    if cid not in deliveries:
        raise SecAggError(f"{step}: no share delivery for client {cid} (it is not part of the "
                          "round after round 1)")
    delivery = deliveries[cid]
    if delivery.receiver != cid:
        raise SecAggError(f"{step}: the delivery for client {cid} is addressed to client "
                          f"{delivery.receiver}")
    _receive_shares(st, delivery)
    return st


def _add_masks(ks: _Keystream, y: np.ndarray, st: ClientState, peers: Iterable[int]) -> None:
    """``y += PRG(b_i) + sum_{j in peers, j>i} PRG(s_ij) - sum_{j in peers, j<i} PRG(s_ij)``
    (in ``y``'s word arithmetic) for client ``i`` = ``st.client_id``."""
    cid = st.client_id
    assert st.b_seed is not None  # drawn when the client advertised its keys
    ks.add(y, st.b_seed)
    s_key = st.s_private()
    for j in sorted(peers):
        try:
            seed = _agree(s_key, st.neighbour_keys[j][1], _INFO_MASK_SEED)
        except ValueError:
            raise _abort(2, f"client {j} advertised an invalid public key") from None
        ks.add(y, seed, subtract=cid > j)
    st.stage = 2


def clients_mask(states: Mapping[int, ClientState], deliveries: Mapping[int, SharesDelivery],
                 inputs: Mapping[int, np.ndarray]) -> list[MaskedInput]:
    """Round 2 for the clients in ``inputs``: check the shares received, send the masked input.

    ``inputs``: client id -> ``uint64`` (or other integer) vector of
    ``vector_len`` values in ``[0, 2^bits)``; ``deliveries`` must hold each
    such client's :class:`SharesDelivery`. A ciphertext that fails
    authentication or carries other ids raises :class:`SecAggAbort` naming the
    sender. Returns one :class:`MaskedInput` per client, ``y_i = x_i + PRG(b_i)
    + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij) mod 2^bits`` over the
    neighbours ``j`` in the delivery.
    """
    out = []
    streams: dict[tuple[int, int], _Keystream] = {}
    for cid in sorted(inputs):
        st = _begin_masking(states, deliveries, cid, "clients_mask")
        y = _check_input(inputs[cid], st.bits, st.vector_len, f"client {cid}")
        if (st.vector_len, st.bits) not in streams:
            streams[st.vector_len, st.bits] = _Keystream(st.vector_len, st.bits)
        _add_masks(streams[st.vector_len, st.bits], y, st, st.mask_peers)
        y &= _mask_of(st.bits, y.dtype)
        out.append(MaskedInput(cid, y.astype(np.uint64, copy=False)))
    return out


def clients_mask_sum(states: Mapping[int, ClientState], deliveries: Mapping[int, SharesDelivery],
                     senders: Collection[int], input_sum: np.ndarray,
                     skip_cancelling: bool = True) -> MaskedSum:
    """Round 2 for the clients ``senders``, relayed as one :class:`MaskedSum`.

    ``input_sum``: the sum modulo ``2^bits`` (or modulo the width of its
    unsigned dtype, which ``2^bits`` divides) of the clients' inputs, as a
    relay that encodes many clients' records accumulates it
    (:meth:`fedsim.secure.layout.SecureLayout.encode` with ``add_to``).
    The result is bit for bit ``sum_masked(clients_mask(states, deliveries,
    inputs), bits)`` for any inputs with that sum, at lower cost:

    In the relayed sum the pairwise mask of two of ``senders`` enters once with
    ``+`` and once with ``-``, so it is neither agreed nor expanded here (only
    for pairs that each list the other in their delivery, i.e. that would both
    have added it). Every other mask is: each client's self mask, and its
    pairwise masks with clients outside ``senders`` (other workers' clients,
    and neighbours that dropped before masking, whose masks the server
    removes). Every client's shares are still decrypted and checked, and every
    client moves to round 2.

    The server's view is unchanged; what the saving changes is the simulation's
    CPU time, which leaves out the cancelled key agreements and PRG expansions
    (about half of a client's ``k`` with two workers). A real client computes
    all ``k`` of its pairwise masks.

    ``skip_cancelling=False``: every client agrees, expands and adds all of its
    masks (its self mask and one per neighbour in its delivery), the cancelling
    ones too, as deployed clients would: the protocol's full client-side cost.
    The masks are added into the relay's running sum rather than into one
    vector per client first (modular addition is associative, so the result
    is the same; what is left out is one copy and one addition of a vector per
    client, no cryptography).
    """
    ids = sorted(_check_id(c) for c in senders)
    if not ids or len(set(ids)) != len(ids):
        raise SecAggError("clients_mask_sum: allowed senders are one or more distinct clients")
    group = frozenset(ids)
    masking = {cid: _begin_masking(states, deliveries, cid, "clients_mask_sum") for cid in ids}
    shapes = {(st.vector_len, st.bits) for st in masking.values()}
    if len(shapes) != 1:
        raise SecAggError("clients_mask_sum: the clients were set up with different vector "
                          "lengths or moduli")
    vector_len, bits = shapes.pop()
    total = np.asarray(input_sum)
    if total.shape != (vector_len,) or total.dtype not in (np.uint32, np.uint64) or \
            (total.dtype == np.uint32 and bits > 32):
        raise SecAggError(f"clients_mask_sum: input_sum must be a uint64 (or, for bits <= 32, "
                          f"uint32) vector of length {vector_len}")
    total = total.astype(word_dtype(bits))  # a copy: input_sum is not modified
    ks = _Keystream(vector_len, bits)
    for cid in ids:
        st = masking[cid]
        cancelled = ({j for j in st.mask_peers & group if cid in masking[j].mask_peers}
                     if skip_cancelling else set())
        _add_masks(ks, total, st, st.mask_peers - cancelled)
    total &= _mask_of(bits, total.dtype)
    return MaskedSum(group, total.astype(np.uint64, copy=False))


def clients_unmask(states: Mapping[int, ClientState],
                   requests: Mapping[int, UnmaskRequest]) -> list[UnmaskResponse]:
    """Round 3 for the clients in ``requests``: reveal the shares the server needs.

    For each survivor ``i`` the client reveals its share of ``b_i``, for each
    dropped neighbour its share of ``s_sk_i``. It refuses (:class:`SecAggAbort`)
    to reveal both kinds for one client, within a request or across requests,
    to treat itself as dropped, to answer about clients it holds no shares of,
    or to answer when fewer than ``t`` of its neighbourhood survived.
    """
    out = []
    for cid in sorted(requests):
        req = requests[cid]
        st = states.get(cid)
        if st is None or st.stage not in (2, 3):
            raise SecAggError(f"clients_unmask: client {cid} has not sent a masked input")
        if req.receiver != cid:
            raise SecAggError(f"clients_unmask: the request for client {cid} is addressed to "
                              f"client {req.receiver}")
        survivors, dropped = frozenset(req.survivors), frozenset(req.dropped)
        both = (survivors & dropped) | (survivors & st.revealed_sk) | (dropped & st.revealed_b)
        if cid in dropped:
            both |= {cid}
        if both:
            raise _abort(3, f"client {cid} refuses to reveal both the self-mask share and the "
                            f"mask-key share of client(s) {sorted(both)}")
        unknown = (survivors | dropped) - st.shares.keys()
        if unknown:
            raise _abort(3, f"client {cid} was asked for shares of client(s) {sorted(unknown)}, "
                            "which it holds none of")
        if len(survivors) < st.threshold:
            raise _abort(3, f"client {cid} refuses to unmask: only {len(survivors)} of its "
                            f"neighbourhood survived, fewer than t={st.threshold}")
        st.revealed_b |= survivors
        st.revealed_sk |= dropped
        st.stage = 3
        out.append(UnmaskResponse(cid, {i: st.shares[i][1] for i in sorted(survivors)},
                                  {i: st.shares[i][0] for i in sorted(dropped)}))
    return out


# --------------------------------------------------------------------------- server

class SecAggServer:
    """The server side of one secure-aggregation round.

    bits: inputs and the sum live in ``Z_(2^bits)``, ``1 <= bits <= 64``.
    vector_len: coordinates per input.
    protocol: ``secagg`` (complete graph) or ``secagg_plus`` (Harary graph).
    threshold: shares needed to recover a secret; None: ``floor(m/2) + 1``
      with ``m`` = neighbourhood size plus one (see the module's docstring).
    graph_seed: seeds the random permutation of the SecAgg+ graph (None: fresh
      entropy).
    neighbours: SecAgg+'s ``k`` (even); None: ``2*ceil(log2(n))``.

    Call :meth:`receive_keys`, :meth:`route_shares`, :meth:`collect_masked`
    and :meth:`unmask` once each, in that order. The sets of clients that
    took part so far are :attr:`clients` (round 0), :attr:`shared` (round 1),
    :attr:`survivors` (round 2) and :attr:`responders` (round 3).
    """

    def __init__(self, bits: int, vector_len: int, protocol: str = "secagg",
                 threshold: int | None = None, graph_seed: int | None = None,
                 neighbours: int | None = None) -> None:
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 64:
            raise SecAggError(f"bits={bits}: allowed is an integer in [1, 64]")
        if (isinstance(vector_len, bool) or not isinstance(vector_len, (int, np.integer))
                or vector_len < 1):
            raise SecAggError(f"vector_len={vector_len}: allowed is an integer >= 1")
        if protocol not in PROTOCOLS:
            raise SecAggError(f"protocol={protocol!r}: allowed is one of {', '.join(PROTOCOLS)}")
        if threshold is not None and (isinstance(threshold, bool)
                                      or not isinstance(threshold, (int, np.integer))
                                      or threshold < 2):
            raise SecAggError(f"threshold={threshold}: allowed is an integer >= 2 (or None for "
                              "floor(m/2) + 1)")
        if neighbours is not None:
            if protocol != "secagg_plus":
                raise SecAggError("neighbours: allowed only with protocol='secagg_plus'")
            if (isinstance(neighbours, bool) or not isinstance(neighbours, (int, np.integer))
                    or neighbours < 2 or neighbours % 2):
                raise SecAggError(f"neighbours={neighbours}: allowed is an even integer >= 2 "
                                  "(or None for 2*ceil(log2(n)))")
        self.bits = int(bits)
        self.vector_len = int(vector_len)
        self.protocol = protocol
        self._threshold_option = None if threshold is None else int(threshold)
        self._neighbours_option = None if neighbours is None else int(neighbours)
        self._graph_rng = np.random.default_rng(graph_seed)
        self._stage = 0
        self.threshold = 0
        self.neighbours: dict[int, frozenset[int]] = {}
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        self.clients: frozenset[int] = frozenset()
        self.shared: frozenset[int] = frozenset()
        self.survivors: frozenset[int] = frozenset()
        self.responders: frozenset[int] = frozenset()
        self._sum = np.zeros(self.vector_len, dtype=np.uint64)
        self._requests: dict[int, UnmaskRequest] = {}

    def _enter(self, stage: int, step: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"SecAggServer.{step}: called out of order (the server is at "
                              f"round {self._stage})")

    @property
    def neighbourhood_size(self) -> int:
        """``k``: neighbours per client (``n - 1`` for ``secagg``)."""
        return max((len(v) for v in self.neighbours.values()), default=0)

    def placement(self, ids: Iterable[int], parts: int) -> list[list[int]]:
        """Split the clients expected to advertise keys into ``parts`` groups
        (sorted; some empty if there are fewer clients than parts) for relays
        that each act for one group (:func:`clients_mask_sum`).

        ``secagg_plus``: consecutive runs of the ring that :meth:`receive_keys`
        will draw for exactly these clients, so that most neighbour pairs fall
        inside one group, where their pairwise masks cancel. ``secagg`` (or a
        graph that will be complete): consecutive runs of the sorted ids.
        Affects only which relay acts for which client, never the result; if
        other clients advertise, the graph is drawn for them instead.
        """
        ids = sorted(_check_id(i) for i in ids)
        if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)) or parts < 1:
            raise SecAggError(f"placement: parts={parts}: allowed is an integer >= 1")
        n = len(ids)
        k = (self._neighbours_option if self._neighbours_option is not None
             else default_neighbours(n))
        order = ids
        if self.protocol == "secagg_plus" and 2 <= min(k, n - 1) < n - 1:
            rng = copy.deepcopy(self._graph_rng)  # the draw receive_keys will make
            order = _ring(ids, rng)
        return [sorted(int(c) for c in part) for part in np.array_split(np.array(order, np.int64),
                                                                         parts)]

    def receive_keys(self, msgs: Iterable[AdvertiseKeys]) -> dict[int, NeighbourKeys]:
        """Round 0: pick the graph and threshold; send each client its neighbours' public keys."""
        self._enter(0, "receive_keys")
        keys: dict[int, tuple[bytes, bytes]] = {}
        for msg in msgs:
            cid = _check_id(msg.client_id)
            if cid in keys:
                raise SecAggError(f"receive_keys: client {cid} advertised keys twice")
            if len(msg.c_pk) != _KEY_BYTES or len(msg.s_pk) != _KEY_BYTES:
                raise _abort(0, f"client {cid} advertised a malformed public key")
            keys[cid] = (bytes(msg.c_pk), bytes(msg.s_pk))
        n = len(keys)
        if n < 2:
            raise _abort(0, f"{n} client(s) advertised keys; at least 2 are needed")
        if self.protocol == "secagg":
            graph = complete_graph(list(keys))
        else:
            k = self._neighbours_option if self._neighbours_option is not None \
                else default_neighbours(n)
            graph = harary_graph(list(keys), min(k, n - 1), self._graph_rng)
        m = min(len(v) for v in graph.values()) + 1
        t = self._threshold_option if self._threshold_option is not None else default_threshold(m)
        if t > m:
            raise _abort(0, f"threshold t={t} exceeds the {m} share holders per client "
                            f"(n={n} clients)")
        self.threshold, self.neighbours, self.public_keys = t, graph, keys
        self.clients = frozenset(keys)
        self._stage = 1
        return {i: NeighbourKeys(i, self.bits, self.vector_len, t,
                                 {j: keys[j] for j in sorted(graph[i])})
                for i in sorted(keys)}

    def route_shares(self, msgs: Iterable[EncryptedShares]) -> dict[int, SharesDelivery]:
        """Round 1: route the ciphertexts among the clients that sent theirs.

        A client whose shares cannot reach at least ``t`` holders (its
        neighbours that took part, plus itself) could never be unmasked:
        :class:`SecAggAbort`.
        """
        self._enter(1, "route_shares")
        sent: dict[int, Mapping[int, bytes]] = {}
        for msg in msgs:
            if msg.sender not in self.clients or msg.sender in sent:
                raise SecAggError(f"route_shares: unexpected or repeated shares from client "
                                  f"{msg.sender}")
            if set(msg.ciphertexts) != self.neighbours[msg.sender]:
                raise _abort(1, f"client {msg.sender} did not send exactly one ciphertext per "
                                "neighbour")
            sent[msg.sender] = msg.ciphertexts
        shared = frozenset(sent)
        for i in sorted(shared):
            holders = len(self.neighbours[i] & shared) + 1
            if holders < self.threshold:
                raise _too_few_shares(1, holders, self.threshold, i)
        self.shared = shared
        self._stage = 2
        return {j: SharesDelivery(j, {i: sent[i][j] for i in sorted(self.neighbours[j] & shared)})
                for j in sorted(shared)}

    def collect_masked(self, msgs: Iterable[MaskedInput | MaskedSum]) -> dict[int, UnmaskRequest]:
        """Round 2: add up the masked inputs (or relays' sums of them); ask each
        survivor for the shares needed.

        Raises :class:`SecAggAbort` when some needed secret has fewer than
        ``t`` surviving holders.
        """
        self._enter(2, "collect_masked")
        survivors: set[int] = set()
        total = np.zeros(self.vector_len, dtype=np.uint64)
        for msg in msgs:
            senders = msg.senders if isinstance(msg, MaskedSum) else frozenset([msg.sender])
            who = ", ".join(str(c) for c in sorted(senders))
            if not senders or not senders <= self.shared or senders & survivors:
                raise SecAggError(f"collect_masked: unexpected or repeated masked input from "
                                  f"client(s) {who}")
            y = np.asarray(msg.y)
            if y.shape != (self.vector_len,) or y.dtype != np.uint64:
                raise SecAggError(f"collect_masked: the masked input of client(s) {who} is "
                                  f"not a uint64 vector of length {self.vector_len}")
            if self.bits < 64 and np.any(y >> np.uint64(self.bits)):
                raise SecAggError(f"collect_masked: the masked input of client(s) {who} has "
                                  f"values >= 2^{self.bits}")
            np.add(total, y, out=total)
            survivors |= senders
        if not survivors:
            raise _abort(2, "no client sent a masked input")
        u3 = frozenset(survivors)
        dropped = self.shared - u3
        self._check_recoverable(2, u3, u3, dropped)
        self.survivors, self._sum = u3, total
        self._requests = {j: UnmaskRequest(j, frozenset((self.neighbours[j] | {j}) & u3),
                                           frozenset(self.neighbours[j] & dropped))
                          for j in sorted(u3)}
        self._stage = 3
        return dict(self._requests)

    def _check_recoverable(self, round_: int, survivors: frozenset[int], holders: frozenset[int],
                           dropped: frozenset[int]) -> None:
        """Abort unless each survivor's ``b`` and each needed dropped ``s_sk`` has ``t`` holders."""
        for i in sorted(survivors):
            have = len((self.neighbours[i] | {i}) & holders)
            if have < self.threshold:
                raise _too_few_shares(round_, have, self.threshold, i)
        for i in sorted(dropped):
            if self.neighbours[i] & survivors:  # someone masked with i: its masks must go
                have = len(self.neighbours[i] & holders)
                if have < self.threshold:
                    raise _too_few_shares(round_, have, self.threshold, i)

    def unmask(self, msgs: Iterable[UnmaskResponse]) -> np.ndarray:
        """Round 3: reconstruct the secrets, remove the masks, return the survivors' sum.

        Needs responses from at least ``t`` holders per secret
        (:class:`SecAggAbort` otherwise). Returns a ``uint64`` vector with
        values in ``[0, 2^bits)``.
        """
        self._enter(3, "unmask")
        b_points: dict[int, list[tuple[int, int]]] = {i: [] for i in self.survivors}
        sk_points: dict[int, list[tuple[int, int]]] = {}
        responders: set[int] = set()
        for msg in msgs:
            j = msg.sender
            if j not in self._requests or j in responders:
                raise SecAggError(f"unmask: unexpected or repeated response from client {j}")
            req = self._requests[j]
            if set(msg.b_shares) != req.survivors or set(msg.sk_shares) != req.dropped:
                raise _abort(3, f"client {j} did not answer with the shares it was asked for")
            responders.add(j)
            for i, y in msg.b_shares.items():
                b_points[i].append((j + 1, int(y)))
            for i, y in msg.sk_shares.items():
                sk_points.setdefault(i, []).append((j + 1, int(y)))
        u4 = frozenset(responders)
        dropped = self.shared - self.survivors
        self._check_recoverable(3, self.survivors, u4, dropped)
        self.responders = u4
        t = self.threshold
        total: np.ndarray = self._sum.astype(word_dtype(self.bits), copy=False)
        ks = _Keystream(self.vector_len, self.bits)
        for i in sorted(self.survivors):
            b = shamir_reconstruct(sorted(b_points[i])[:t])
            if b >> (8 * _KEY_BYTES):
                raise _abort(3, f"the shares of client {i}'s self-mask seed are inconsistent")
            ks.add(total, b.to_bytes(_KEY_BYTES, "big"), subtract=True)
        for i in sorted(dropped):
            peers = sorted(self.neighbours[i] & self.survivors)
            if not peers:
                continue
            sk = shamir_reconstruct(sorted(sk_points[i])[:t])
            if sk >> (8 * _KEY_BYTES) or _public(sk.to_bytes(_KEY_BYTES, "big")) \
                    != self.public_keys[i][1]:
                raise _abort(3, f"the mask key reconstructed for dropped client {i} does not "
                                "match its advertised public key")
            sk_raw = sk.to_bytes(_KEY_BYTES, "big")
            for j in peers:
                seed = _agree(sk_raw, self.public_keys[j][1], _INFO_MASK_SEED)
                # y_j holds +PRG(s_ij) when j < i and -PRG(s_ij) when j > i: take it out
                ks.add(total, seed, subtract=j < i)
        total &= _mask_of(self.bits, total.dtype)
        self._sum = np.zeros(0, dtype=np.uint64)
        self._stage = 4
        return total.astype(np.uint64, copy=False)


# --------------------------------------------------------------------------- in-process run

def run_secure_sum(inputs: Mapping[int, np.ndarray], bits: int, protocol: str = "secagg", *,
                   drop_before_sharing: Collection[int] = (),
                   drop_before_masking: Collection[int] = (),
                   drop_after_masking: Collection[int] = (),
                   threshold: int | None = None, neighbours: int | None = None,
                   seed: int | None = None) -> np.ndarray:
    """Run the whole protocol in this process and return the secure sum.

    inputs: client id -> integer vector (all of one length) with values in
      ``[0, 2^bits)``.
    drop_before_sharing: clients that advertise keys, then vanish (round 1).
    drop_before_masking: clients that share keys, then send no masked input
      (their pairwise masks are removed using their reconstructed ``s_sk``).
    drop_after_masking: clients that send a masked input, then do not answer
      the unmasking request (their inputs still count).
    seed: None for ``os.urandom`` keys; an int makes the run reproducible (it
      seeds both the clients' randomness and the SecAgg+ graph).

    Returns ``sum of inputs[i] mod 2^bits`` over the clients that sent a masked
    input (all but the first two drop sets), as ``uint64``. Raises
    :class:`SecAggAbort` when the dropouts leave too few shares.
    """
    ids = sorted(_check_id(i) for i in inputs)
    drops = [set(map(int, d)) for d in (drop_before_sharing, drop_before_masking,
                                        drop_after_masking)]
    for d in drops:
        if not d <= set(ids):
            raise SecAggError(f"run_secure_sum: dropped clients {sorted(d - set(ids))} have no "
                              "input")
    if drops[0] & drops[1] or drops[0] & drops[2] or drops[1] & drops[2]:
        raise SecAggError("run_secure_sum: a client can drop out only once")
    lengths = {np.asarray(inputs[i]).shape for i in ids}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise SecAggError("run_secure_sum: the inputs must be vectors of one length")
    vector_len = next(iter(lengths))[0]
    server = SecAggServer(bits, vector_len, protocol, threshold=threshold, graph_seed=seed,
                          neighbours=neighbours)
    states, adverts = clients_advertise(ids, seed)
    setups = server.receive_keys(adverts)
    shares = clients_share_keys(states, {i: s for i, s in setups.items() if i not in drops[0]})
    deliveries = server.route_shares(shares)
    maskers = [i for i in deliveries if i not in drops[1]]
    masked = clients_mask(states, deliveries, {i: inputs[i] for i in maskers})
    requests = server.collect_masked(masked)
    responses = clients_unmask(states, {i: r for i, r in requests.items() if i not in drops[2]})
    return server.unmask(responses)

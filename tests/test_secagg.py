"""Secure aggregation (SecAgg, SecAgg+): exact sums, masking, dropouts, tampering, graphs."""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
from scipy import special

from fedsim.errors import FedsimError
from fedsim.secure.fixedpoint import FixedPointCodec
from fedsim.secure.protocol import (
    PRIME,
    SecAggAbort,
    SecAggError,
    SecAggServer,
    SharesDelivery,
    UnmaskRequest,
    clients_advertise,
    clients_mask,
    clients_share_keys,
    clients_unmask,
    default_neighbours,
    harary_graph,
    run_secure_sum,
    shamir_reconstruct,
    shamir_split,
)

ABORT = re.compile(r"secure aggregation aborted in round \d: only \d+ of the t=\d+ shares needed "
                   r"to recover client \d+ are available; the round's update is discarded")


def _inputs(n: int, d: int, bits: int, seed: int = 0, ids: list[int] | None = None
            ) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = ids if ids is not None else [3 * i + 1 for i in range(n)]  # ids need not be 0..n-1
    high = np.uint64((1 << bits) - 1)
    return {i: rng.integers(0, high, size=d, dtype=np.uint64, endpoint=True) for i in ids}


def _modsum(vectors, bits: int) -> np.ndarray:
    total = np.zeros_like(next(iter(vectors)))
    for v in vectors:
        total += v
    return total & np.uint64((1 << bits) - 1)


def _rounds_0_1(inputs, bits, protocol="secagg", seed=0, **server_options):
    d = len(next(iter(inputs.values())))
    server = SecAggServer(bits, d, protocol, graph_seed=seed, **server_options)
    states, adverts = clients_advertise(list(inputs), seed)
    setups = server.receive_keys(adverts)
    deliveries = server.route_shares(clients_share_keys(states, setups))
    return server, states, deliveries


# ------------------------------------------------------------------ (1) exact sums

@pytest.mark.parametrize("protocol", ["secagg", "secagg_plus"])
@pytest.mark.parametrize("n", [3, 10, 40])
def test_sum_is_exact(protocol: str, n: int) -> None:
    inputs = _inputs(n, 257, 32, seed=n)
    total = run_secure_sum(inputs, 32, protocol, seed=n)
    assert total.dtype == np.uint64
    np.testing.assert_array_equal(total, _modsum(inputs.values(), 32))


@pytest.mark.parametrize("bits", [1, 17, 62, 64])
def test_sum_is_exact_for_any_modulus(bits: int) -> None:
    inputs = _inputs(5, 100, bits, seed=bits)
    np.testing.assert_array_equal(run_secure_sum(inputs, bits, "secagg_plus", seed=1),
                                  _modsum(inputs.values(), bits))


def test_fixed_point_sum_through_secure_aggregation() -> None:
    rng = np.random.default_rng(5)
    n, d, clip = 12, 300, 1.0
    codec = FixedPointCodec.for_sum(clip, n)
    x = rng.uniform(-clip, clip, size=(n, d)) / math.sqrt(d)
    inputs = {i: codec.encode(x[i], rng) for i in range(n)}
    total = run_secure_sum(inputs, codec.bits, "secagg_plus", seed=2, drop_before_masking={4})
    decoded = codec.decode_sum(total, n - 1)
    expected = x.sum(axis=0) - x[4]
    assert np.abs(decoded - expected).max() <= codec.error_bound(n - 1)


def test_seeded_runs_are_reproducible_and_unseeded_runs_are_not() -> None:
    inputs = _inputs(6, 50, 24)

    def masked(seed):
        server, states, deliveries = _rounds_0_1(inputs, 24, "secagg_plus", seed=seed)
        return [m.y for m in clients_mask(states, deliveries, inputs)]

    for a, b in zip(masked(9), masked(9)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(masked(None)[0], masked(None)[0])
    # a numpy Generator works as well
    states, _ = clients_advertise([1, 2], np.random.default_rng(0))
    assert states[1].c_pk != states[2].c_pk


# ------------------------------------------------------------------ (2) masking hides the input

@pytest.mark.parametrize("protocol", ["secagg", "secagg_plus"])
def test_masked_vector_is_uniform_and_uncorrelated(protocol: str) -> None:
    bits, d, n = 32, 1 << 16, 12
    rng = np.random.default_rng(3)
    codec = FixedPointCodec.for_sum(1.0, n, bits=bits)
    inputs = {i: codec.encode(rng.normal(scale=0.3, size=d) / 4, rng) for i in range(n)}
    server, states, deliveries = _rounds_0_1(inputs, bits, protocol, seed=4)
    masked_msgs = clients_mask(states, deliveries, inputs)
    masked = {m.sender: m.y for m in masked_msgs}
    x, y = inputs[0], masked[0]

    def top_byte_p_value(v: np.ndarray) -> float:
        counts = np.bincount((v >> np.uint64(bits - 8)).astype(np.int64), minlength=256)
        expected = len(v) / 256
        return float(special.chdtrc(255, ((counts - expected) ** 2 / expected).sum()))

    assert top_byte_p_value(y) > 1e-4
    assert top_byte_p_value(x) < 1e-4  # the same test rejects the unmasked input
    corr = np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1]
    assert abs(corr) < 5 / math.sqrt(d)
    assert int(y.max()) < 2**bits
    # and the masks still cancel in the sum
    total = server.unmask(clients_unmask(states, server.collect_masked(masked_msgs)))
    np.testing.assert_array_equal(total, _modsum(inputs.values(), bits))


# ------------------------------------------------------------------ (3) dropouts

def _finish(server, states, deliveries, inputs, before=frozenset(), after=frozenset()):
    """Rounds 2 and 3 with clients dropping before masking / after masking."""
    masked = clients_mask(states, deliveries, {i: inputs[i] for i in deliveries if i not in before})
    requests = server.collect_masked(masked)
    responses = clients_unmask(states, {j: r for j, r in requests.items() if j not in after})
    return server.unmask(responses)


@pytest.mark.parametrize("dropped", [0, 1, 4])
def test_dropouts_after_masking_up_to_n_minus_t_are_recovered(dropped: int) -> None:
    n, bits = 10, 40
    inputs = _inputs(n, 64, bits, ids=list(range(n)))
    after = set(range(dropped))
    total = run_secure_sum(inputs, bits, drop_after_masking=after, seed=1)
    np.testing.assert_array_equal(total, _modsum(inputs.values(), bits))  # their inputs count


@pytest.mark.parametrize("dropped", [1, 4])
def test_dropouts_before_masking_up_to_n_minus_t_are_recovered(dropped: int) -> None:
    n, bits = 10, 40
    inputs = _inputs(n, 64, bits, ids=list(range(n)))
    before = set(range(2, 2 + dropped))
    total = run_secure_sum(inputs, bits, drop_before_masking=before, seed=1)
    np.testing.assert_array_equal(
        total, _modsum([v for i, v in inputs.items() if i not in before], bits))


def test_mixed_dropouts_are_recovered() -> None:
    n, bits = 10, 40
    inputs = _inputs(n, 64, bits, ids=list(range(n)))
    total = run_secure_sum(inputs, bits, drop_before_sharing={0}, drop_before_masking={5, 9},
                           drop_after_masking={1}, seed=2)  # t = 6 of 10
    np.testing.assert_array_equal(
        total, _modsum([v for i, v in inputs.items() if i not in (0, 5, 9)], bits))


@pytest.mark.parametrize("when, round_", [("after", 3), ("before", 2)])
def test_more_than_n_minus_t_dropouts_abort(when: str, round_: int) -> None:
    n, bits = 10, 40
    inputs = _inputs(n, 16, bits, ids=list(range(n)))
    option = {"after": "drop_after_masking", "before": "drop_before_masking"}[when]
    with pytest.raises(SecAggAbort, match=ABORT) as info:
        run_secure_sum(inputs, bits, **{option: set(range(5))}, seed=1)  # n - t = 4
    assert f"round {round_}: only 5 of the t=6 shares" in str(info.value)
    assert isinstance(info.value, FedsimError)


def test_too_many_dropouts_before_sharing_abort() -> None:
    inputs = _inputs(10, 16, 40, ids=list(range(10)))
    with pytest.raises(SecAggAbort, match="round 1: only 5 of the t=6"):
        run_secure_sum(inputs, 40, drop_before_sharing=set(range(5)), seed=1)


@pytest.mark.parametrize("when", ["before", "after"])
def test_secagg_plus_tolerates_m_minus_t_dropouts_per_neighbourhood(when: str) -> None:
    n, bits = 40, 32
    inputs = _inputs(n, 128, bits, ids=list(range(n)))
    server, states, deliveries = _rounds_0_1(inputs, bits, "secagg_plus", seed=3)
    k, t = server.neighbourhood_size, server.threshold
    assert (k, t) == (12, 7)
    centre = 17
    ring = sorted(server.neighbours[centre])
    drop = set(ring[: k + 1 - t])  # m - t = 6 of client 17's neighbours
    kwargs = {"before": drop} if when == "before" else {"after": drop}
    total = _finish(server, states, deliveries, inputs, **kwargs)
    kept = [v for i, v in inputs.items() if when == "after" or i not in drop]
    np.testing.assert_array_equal(total, _modsum(kept, bits))

    # one more dropout in that neighbourhood and client 17 can no longer be unmasked
    server, states, deliveries = _rounds_0_1(inputs, bits, "secagg_plus", seed=3)
    drop = set(ring[: k + 2 - t])
    kwargs = {"before": drop} if when == "before" else {"after": drop}
    with pytest.raises(SecAggAbort, match=ABORT):
        _finish(server, states, deliveries, inputs, **kwargs)


# ------------------------------------------------------------------ (4) authenticity, refusals

def test_tampered_share_ciphertext_is_detected() -> None:
    inputs = _inputs(5, 8, 16, ids=[0, 1, 2, 3, 4])
    server, states, deliveries = _rounds_0_1(inputs, 16)
    blob = bytearray(deliveries[3].ciphertexts[2])
    blob[40] ^= 0x01
    tampered = dict(deliveries)
    tampered[3] = SharesDelivery(3, {**deliveries[3].ciphertexts, 2: bytes(blob)})
    with pytest.raises(SecAggAbort, match="client 3 could not authenticate the share ciphertext "
                                          "from client 2"):
        clients_mask(states, tampered, {3: inputs[3]})


def test_misrouted_share_ciphertext_is_detected() -> None:
    inputs = _inputs(5, 8, 16, ids=[0, 1, 2, 3, 4])
    server, states, deliveries = _rounds_0_1(inputs, 16)
    # client 2's ciphertext for client 4, handed to client 3 as if it were for 3
    misrouted = {3: SharesDelivery(3, {**deliveries[3].ciphertexts,
                                       2: deliveries[4].ciphertexts[2]})}
    with pytest.raises(SecAggAbort, match="from client 2"):
        clients_mask(states, misrouted, {3: inputs[3]})


def test_client_refuses_to_reveal_both_shares_of_a_peer() -> None:
    inputs = _inputs(6, 8, 16, ids=list(range(6)))
    server, states, deliveries = _rounds_0_1(inputs, 16)
    requests = server.collect_masked(clients_mask(states, deliveries, inputs))
    req = requests[0]
    assert req.survivors == frozenset(range(6)) and not req.dropped
    # both kinds for client 4 in one request
    with pytest.raises(SecAggAbort, match=r"client 0 refuses to reveal both .* client\(s\) \[4\]"):
        clients_unmask(states, {0: UnmaskRequest(0, req.survivors, frozenset({4}))})
    # one kind now, the other kind later
    clients_unmask(states, {0: req})
    with pytest.raises(SecAggAbort, match=r"client 0 refuses to reveal both"):
        clients_unmask(states, {0: UnmaskRequest(0, req.survivors - {4}, frozenset({4}))})
    # its own mask key: never
    with pytest.raises(SecAggAbort, match=r"client 1 refuses to reveal both .*\[1\]"):
        clients_unmask(states, {1: UnmaskRequest(1, frozenset(range(2, 6)), frozenset({1}))})


def test_corrupted_key_share_is_detected_by_the_server() -> None:
    inputs = _inputs(6, 8, 16, ids=list(range(6)))
    server, states, deliveries = _rounds_0_1(inputs, 16)
    requests = server.collect_masked(
        clients_mask(states, deliveries, {i: v for i, v in inputs.items() if i != 5}))
    responses = clients_unmask(states, requests)
    bad = replace(responses[0], sk_shares={5: (responses[0].sk_shares[5] + 1) % PRIME})
    with pytest.raises(SecAggAbort, match="dropped client 5 does not match"):
        server.unmask([bad] + responses[1:])


def test_shamir_any_t_shares_recover_the_secret() -> None:
    rng = np.random.default_rng(0)
    secret = int.from_bytes(rng.bytes(32), "big")
    xs = [1, 5, 9, 12, 30, 31, 77]
    shares = shamir_split(secret, 4, xs, rng.bytes)
    points = list(zip(xs, shares))
    for subset in ([0, 1, 2, 3], [3, 4, 5, 6], [0, 2, 4, 6]):
        assert shamir_reconstruct([points[k] for k in subset]) == secret
    assert shamir_reconstruct(points[:3]) != secret


# ------------------------------------------------------------------ (5) SecAgg+ graphs

def _connected(graph: dict[int, frozenset[int]]) -> bool:
    start = next(iter(graph))
    seen, todo = {start}, deque([start])
    while todo:
        for j in graph[todo.popleft()] - seen:
            seen.add(j)
            todo.append(j)
    return len(seen) == len(graph)


def test_secagg_plus_neighbourhoods_are_logarithmic_symmetric_and_connected() -> None:
    n = 200
    server = SecAggServer(16, 4, "secagg_plus", graph_seed=0)
    _, adverts = clients_advertise(range(n), 0)
    setups = server.receive_keys(adverts)
    graph = server.neighbours
    k = server.neighbourhood_size
    assert k == 2 * math.ceil(math.log2(n)) == 16 and k < n / 10
    assert all(len(nb) == k for nb in graph.values())
    assert all(i not in graph[i] and all(i in graph[j] for j in graph[i]) for i in graph)
    assert _connected(graph)
    assert server.threshold == k // 2 + 1
    assert all(set(setups[i].keys) == graph[i] for i in graph)  # O(k) keys per client
    # the ring order is random: neighbours are not just the adjacent ids
    assert graph[0] != frozenset(range(1, 9)) | frozenset(range(192, 200))


@pytest.mark.parametrize("n, k", [(5, 2), (11, 4), (30, 6), (64, 12), (9, 8), (9, 20)])
def test_harary_graph_is_regular_symmetric_connected(n: int, k: int) -> None:
    graph = harary_graph(list(range(n)), k, np.random.default_rng(n))
    degree = min(k, n - 1)
    assert all(len(nb) == degree for nb in graph.values())
    assert all(i in graph[j] for i in graph for j in graph[i])
    assert _connected(graph)


def test_default_parameters() -> None:
    assert [default_neighbours(n) for n in (2, 3, 10, 100, 200, 1000)] == [1, 2, 8, 14, 16, 20]
    server = SecAggServer(16, 4, "secagg")
    server.receive_keys(clients_advertise(range(9), 0)[1])
    assert server.threshold == 9 // 2 + 1 and server.neighbourhood_size == 8


# ------------------------------------------------------------------ errors

def test_bad_parameters_and_inputs_are_refused() -> None:
    for kwargs in ({"bits": 0, "vector_len": 4}, {"bits": 65, "vector_len": 4},
                   {"bits": 8, "vector_len": 0}, {"bits": 8, "vector_len": 4, "protocol": "x"},
                   {"bits": 8, "vector_len": 4, "threshold": 1},
                   {"bits": 8, "vector_len": 4, "protocol": "secagg_plus", "neighbours": 3},
                   {"bits": 8, "vector_len": 4, "neighbours": 4}):
        with pytest.raises(SecAggError):
            SecAggServer(**kwargs)
    with pytest.raises(SecAggAbort, match="threshold t=9 exceeds"):
        SecAggServer(8, 4, threshold=9).receive_keys(clients_advertise(range(5), 0)[1])
    with pytest.raises(SecAggAbort, match="at least 2"):
        SecAggServer(8, 4).receive_keys(clients_advertise([0], 0)[1])
    inputs = _inputs(3, 4, 8, ids=[0, 1, 2])
    with pytest.raises(ValueError, match=">= 2\\^8"):
        run_secure_sum({**inputs, 0: np.array([256, 0, 0, 0])}, 8)
    with pytest.raises(SecAggError, match="dtype float64"):
        run_secure_sum({**inputs, 0: np.zeros(4)}, 8)
    with pytest.raises(SecAggError, match="shape"):
        server, states, deliveries = _rounds_0_1(inputs, 8)
        clients_mask(states, deliveries, {0: np.zeros(5, dtype=np.uint64)})


def test_server_steps_out_of_order_are_refused() -> None:
    server = SecAggServer(8, 4)
    with pytest.raises(SecAggError, match="out of order"):
        server.unmask([])
    server.receive_keys(clients_advertise(range(3), 0)[1])
    with pytest.raises(SecAggError, match="out of order"):
        server.receive_keys([])


def test_relayed_sums_of_masked_inputs_unmask_to_the_same_sum():
    """A worker may add its clients' masked inputs before sending (MaskedSum)."""
    from fedsim.secure.protocol import (
        SecAggError,
        SecAggServer,
        clients_advertise,
        clients_mask,
        clients_share_keys,
        clients_unmask,
        sum_masked,
    )

    rng = np.random.default_rng(5)
    bits, d, ids = 20, 64, list(range(9))
    inputs = {i: rng.integers(0, 2**bits, size=d, dtype=np.uint64) for i in ids}
    server = SecAggServer(bits, d, "secagg_plus", graph_seed=1)
    states, adverts = clients_advertise(ids, 3)
    deliveries = server.route_shares(clients_share_keys(states, server.receive_keys(adverts)))
    masked = clients_mask(states, deliveries, inputs)
    relayed = [sum_masked(masked[:4], bits), sum_masked(masked[4:], bits)]
    requests = server.collect_masked(relayed)
    dropped = {7}
    total = server.unmask(clients_unmask(states, {i: r for i, r in requests.items()
                                                  if i not in dropped}))
    expected = np.zeros(d, np.uint64)
    for v in inputs.values():
        expected = (expected + v) % np.uint64(2**bits)
    np.testing.assert_array_equal(total, expected)
    with pytest.raises(SecAggError, match="repeated"):  # the same client twice
        sum_masked([masked[0], masked[0]], bits)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("bits", [20, 32, 40])
def test_clients_mask_sum_equals_the_sum_of_per_client_masked_inputs(bits, skip):
    """A worker's relayed sum skips the pairwise masks that cancel inside it (or,
    skip_cancelling=False, adds every client's masks in full); either way the
    server must receive exactly what summing the clients' own masked inputs gives,
    also when a neighbour dropped before masking (its masks stay in)."""
    from fedsim.secure.protocol import (
        SecAggServer,
        clients_advertise,
        clients_mask,
        clients_mask_sum,
        clients_share_keys,
        clients_unmask,
        sum_masked,
    )

    rng = np.random.default_rng(8)
    d, ids, dropped = 48, list(range(0, 30, 2)), {6, 20}
    inputs = {i: rng.integers(0, 2**bits, size=d, dtype=np.uint64) for i in ids}
    groups = [[i for i in ids[:8] if i not in dropped], [i for i in ids[8:] if i not in dropped]]

    def rounds_0_1():
        server = SecAggServer(bits, d, "secagg_plus", graph_seed=4, neighbours=6)
        states, adverts = clients_advertise(ids, 11)
        deliveries = server.route_shares(clients_share_keys(states, server.receive_keys(adverts)))
        return server, states, deliveries

    _, states, deliveries = rounds_0_1()
    per_client = [sum_masked(clients_mask(states, deliveries, {i: inputs[i] for i in g}), bits)
                  for g in groups]
    server, states, deliveries = rounds_0_1()
    relayed = [clients_mask_sum(states, deliveries, g, sum(inputs[i] for i in g),
                                skip_cancelling=skip) for g in groups]
    for a, b in zip(per_client, relayed):
        assert a.senders == b.senders
        np.testing.assert_array_equal(a.y, b.y)
        assert b.y.dtype == np.uint64
    # the relayed sums unmask to the survivors' exact modular sum
    total = server.unmask(clients_unmask(states, server.collect_masked(relayed)))
    expected = sum(inputs[i] for g in groups for i in g) % np.uint64(2**bits)
    np.testing.assert_array_equal(total, expected)


def test_placement_follows_the_ring_that_receive_keys_draws():
    """SecAgg+: the relays' groups are runs of the graph's ring, so most
    neighbour pairs share a relay; the graph is the one receive_keys then draws."""
    from fedsim.secure.protocol import SecAggServer, clients_advertise

    ids = list(range(3, 303, 3))  # n = 100, k = 14
    server = SecAggServer(24, 8, "secagg_plus", graph_seed=7)
    groups = server.placement(ids, 2)
    assert sorted(c for g in groups for c in g) == ids and all(len(g) == 50 for g in groups)
    server.receive_keys(clients_advertise(ids, 1)[1])
    owner = {c: i for i, g in enumerate(groups) for c in g}
    pairs = [(i, j) for i, nbrs in server.neighbours.items() for j in nbrs if i < j]
    inside = sum(owner[i] == owner[j] for i, j in pairs) / len(pairs)
    assert len(pairs) == 700 and inside >= 1 - 2 * 28 / 700  # only the 2 cuts' pairs cross
    # full SecAgg, or fewer clients than parts: runs of the sorted ids
    assert SecAggServer(24, 8, "secagg").placement([5, 1, 3], 2) == [[1, 3], [5]]
    assert SecAggServer(24, 8, "secagg_plus").placement([4], 3) == [[4], [], []]


def test_hkdf_is_cryptographys_hkdf_sha256():
    """The key derivation (one-shot HMACs) gives cryptography's HKDF-SHA256 bytes
    (no salt, 32 bytes), so seeds, keys and messages are unchanged."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from fedsim.secure.protocol import _INFO_MASK_SEED, _INFO_SHARE_KEY, _hkdf_sha256

    rng = np.random.default_rng(12)
    for info in (_INFO_MASK_SEED, _INFO_SHARE_KEY, b""):
        for _ in range(20):
            ikm = rng.bytes(32)
            expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                            info=info).derive(ikm)
            assert _hkdf_sha256(ikm, info) == expected


def test_full_cost_share_keys_derive_every_key_and_agree_with_the_shared_ones(monkeypatch):
    """clients_share_keys derives a pair's key once for two clients of the call
    (X25519 is symmetric) unless share_pair_keys=False, where every client
    derives each of its keys itself (the full client cost); the keys are equal."""
    from fedsim.secure import protocol

    ids = list(range(0, 40, 2))
    calls = []
    real = protocol._agree
    monkeypatch.setattr(protocol, "_agree", lambda *a: calls.append(a) or real(*a))
    keys = {}
    for share in (True, False):
        server = protocol.SecAggServer(20, 8, "secagg_plus", graph_seed=2, neighbours=6)
        states, adverts = protocol.clients_advertise(ids, 9)
        setups = server.receive_keys(adverts)
        calls.clear()
        protocol.clients_share_keys(states, setups, share_pair_keys=share)
        keys[share] = ({c: dict(st.share_keys) for c, st in states.items()}, len(calls))
    degrees = sum(len(server.neighbours[c]) for c in ids)
    assert degrees == 6 * len(ids)
    assert keys[False][1] == degrees and keys[True][1] == degrees // 2
    assert keys[True][0] == keys[False][0]

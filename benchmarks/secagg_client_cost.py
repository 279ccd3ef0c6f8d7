"""One worker's client-side SecAgg+ work, step by step, without Ray or training.

For a cohort of ``--cohort`` clients (SecAgg+, default neighbourhood) on two
workers, the first worker's half of the clients runs the protocol's client
steps on ``--dim``-coordinate records (the benchmark MLP's size by default):
round 0 (``advertise``: key pairs), round 1 (``share_keys``: Shamir shares,
their encryption), the fixed-point encoding of the records (``encode``) and
round 2 (``mask``: the shares' decryption, the mask seeds' key agreements,
the masks' expansion and addition). The other worker's clients and the server
run too, untimed. Variants, alternated ``--repeats`` times in one process:

- ``per_client``: every client masks its own encoded record
  (``clients_mask``), the worker adds the masked records up (``sum_masked``);
- ``full``: every client's masks, the cancelling ones too, go into the
  worker's running sum of encodings (``clients_mask_sum(skip_cancelling=False)``),
  the same message as ``per_client``;
- ``skip``: the masks that cancel inside the worker are skipped, the shards
  follow the ring (fedsim's default).

Prints the median seconds of each step per variant, and checks that
``per_client`` and ``full`` send the same masked sum.

    uv run python benchmarks/secagg_client_cost.py [--cohort 1000] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import numpy as np

from fedsim.config import SecAggConfig
from fedsim.secure import protocol as P
from fedsim.secure.layout import make_layout


def one_run(cohort: int, dim: int, variant: str, profile: cProfile.Profile | None
            ) -> tuple[dict[str, float], np.ndarray]:
    """Seconds per client step of the first worker, and its masked sum."""
    layout = make_layout(SecAggConfig(protocol="secagg_plus"), 1.0, [dim], cohort)
    server = P.SecAggServer(layout.bits, layout.vector_len, "secagg_plus", graph_seed=1)
    ids = list(range(0, 2 * cohort, 2))
    shards = (server.placement(ids, 2) if variant == "skip"
              else [[int(c) for c in part] for part in np.array_split(ids, 2)])
    mine, other = shards
    rng = np.random.default_rng(0)
    records = rng.normal(size=(8, dim))
    records /= np.linalg.norm(records, axis=1, keepdims=True)  # L2 norm 1 = the clip
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *args, **kw):
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        seconds[step] = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        return out

    other_states, other_ads = P.clients_advertise(other, 7)
    states, ads = timed("advertise", P.clients_advertise, mine, 7)
    setups = server.receive_keys(ads + other_ads)
    shares = timed("share_keys", P.clients_share_keys, states, {c: setups[c] for c in mine})
    other_shares = P.clients_share_keys(other_states, {c: setups[c] for c in other})
    deliveries = server.route_shares(shares + other_shares)
    mine_deliveries = {c: deliveries[c] for c in mine}

    def encode():
        if variant == "per_client":
            return {c: layout.encode([records[c % 8]], np.random.default_rng(c)) for c in mine}
        total = np.zeros(layout.vector_len, layout.word_dtype)
        for c in mine:
            layout.encode([records[c % 8]], np.random.default_rng(c), add_to=total)
        return total

    encoded = timed("encode", encode)
    if variant == "per_client":
        masked = timed("mask", lambda: P.sum_masked(
            P.clients_mask(states, mine_deliveries, encoded), layout.bits))
    else:
        masked = timed("mask", P.clients_mask_sum, states, mine_deliveries, mine, encoded,
                       skip_cancelling=variant == "skip")
    seconds["total"] = sum(seconds.values())
    return seconds, masked.y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=106510)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["per_client", "full", "skip"],
                    choices=["per_client", "full", "skip"])
    ap.add_argument("--profile", action="store_true",
                    help="print a cProfile of the timed steps (all variants and repeats)")
    args = ap.parse_args()
    profile = cProfile.Profile() if args.profile else None
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    sums: dict[str, np.ndarray] = {}
    for rep in range(args.repeats):
        for v in (args.variants if rep % 2 == 0 else args.variants[::-1]):
            seconds, sums[v] = one_run(args.cohort, args.dim, v, profile)
            runs[v].append(seconds)
    if "per_client" in sums and "full" in sums:
        assert np.array_equal(sums["per_client"], sums["full"]), "full != per_client"
    steps = list(next(iter(runs.values()))[0])
    print(f"{args.cohort} clients per round, {args.cohort // 2} timed, {args.dim} coordinates; "
          "median seconds")
    print(f"{'variant':>11} " + " ".join(f"{s:>10}" for s in steps))
    for v, rows in runs.items():
        print(f"{v:>11} " + " ".join(f"{statistics.median(r[s] for r in rows):>10.3f}"
                                     for s in steps))
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()

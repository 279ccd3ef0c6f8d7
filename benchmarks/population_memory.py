"""Memory against population size: the same simulation at 1,000, 10,000 and
100,000 clients, 10 (``--per-round``) clients per round, on LEAF synthetic data (generated per
client on demand, so the data itself does not grow with the population).

Prints, per population, the peak resident memory (MiB) of the server actor and
of the worker actors, the driver's current RSS, and each total's ratio to the
smallest population's. Flat memory means ratios close to 1.0.

With ``--algorithm scaffold`` every client's control variate lives in the
on-disk store (:mod:`fedsim.client.state`), written into a temporary directory
that is removed afterwards; the table then also shows the disk space the store
takes (``summary["memory_mib"]["client_state_disk_mib"]``: the allocated blocks
of its sparse shard files, so only the clients that trained count).

    uv run python benchmarks/population_memory.py [--rounds 5] [--per-round 100]
        [--algorithm fedavg|scaffold]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(population: int, rounds: int, per_round: int,
            algorithm: str = "fedavg") -> dict[str, float]:
    from fedsim.config import (
        AlgorithmConfig,
        DataConfig,
        ModelConfig,
        RayConfig,
        ServerConfig,
        SimConfig,
    )
    from fedsim.simulation import run_simulation

    with tempfile.TemporaryDirectory(prefix="fedsim-population-state-") as tmp:
        extra = {}
        if algorithm != "fedavg":
            # conf/algorithm/scaffold.yaml's uniform weighting; the store in tmp
            extra = dict(algorithm=AlgorithmConfig(name=algorithm,
                                                   state_dir=os.path.join(tmp, "state")),
                         server=ServerConfig(weighting="uniform"))
        cfg = SimConfig(clients=population, clients_per_round=per_round, rounds=rounds,
                        progress=False, local_epochs=1,
                        data=DataConfig(name="synthetic", test_clients=50),
                        model=ModelConfig(name="mlp", hidden=[64]),
                        ray=RayConfig(num_cpus=2, workers=2), **extra)
        mem = run_simulation(cfg).summary["memory_mib"]
    out = {"driver": mem["driver"]["rss"], "server": mem["server"]["peak"],
           "workers": sum(w["peak"] for w in mem["workers"])}
    if "client_state_disk_mib" in mem:
        out["disk"] = mem["client_state_disk_mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--populations", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--per-round", type=int, default=10, help="clients per round")
    ap.add_argument("--algorithm", default="fedavg", choices=["fedavg", "scaffold"],
                    help="scaffold: client control variates in an on-disk store")
    args = ap.parse_args()
    results = {n: measure(n, args.rounds, args.per_round, args.algorithm)
               for n in args.populations}
    procs = ("driver", "server", "workers")
    first = results[args.populations[0]]
    base = sum(first[k] for k in procs)
    disk = "disk" in first
    print(f"{args.algorithm}, {args.rounds} rounds of {args.per_round} clients")
    print(f"{'clients':>9} {'driver MiB':>11} {'server MiB':>11} {'workers MiB':>12} "
          f"{'driver x':>9} {'server x':>9} {'workers x':>10} {'total x':>8}"
          + (f" {'disk MiB':>9}" if disk else ""))
    for n, r in results.items():
        ratios = " ".join(f"{r[k] / first[k]:>{w}.3f}" for k, w in zip(procs, (9, 9, 10)))
        print(f"{n:>9} {r['driver']:>11.0f} {r['server']:>11.0f} {r['workers']:>12.0f} "
              f"{ratios} {sum(r[k] for k in procs) / base:>8.3f}"
              + (f" {r['disk']:>9.2f}" if disk else ""))


if __name__ == "__main__":
    main()

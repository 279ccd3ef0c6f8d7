"""Memory against population size: the same simulation at 1,000, 10,000 and
100,000 clients, 10 (``--per-round``) clients per round, on LEAF synthetic data (generated per
client on demand, so the data itself does not grow with the population).

Prints, per population, the peak resident memory (MiB) of the server actor and
of the worker actors, the driver's current RSS, and each total's ratio to the
smallest population's. Flat memory means ratios close to 1.0.

    uv run python benchmarks/population_memory.py [--rounds 5] [--per-round 100]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(population: int, rounds: int, per_round: int) -> dict[str, float]:
    from fedsim.config import DataConfig, ModelConfig, RayConfig, SimConfig
    from fedsim.simulation import run_simulation

    cfg = SimConfig(clients=population, clients_per_round=per_round, rounds=rounds,
                    progress=False, local_epochs=1,
                    data=DataConfig(name="synthetic", test_clients=50),
                    model=ModelConfig(name="mlp", hidden=[64]),
                    ray=RayConfig(num_cpus=2, workers=2))
    mem = run_simulation(cfg).summary["memory_mib"]
    return {"driver": mem["driver"]["rss"], "server": mem["server"]["peak"],
            "workers": sum(w["peak"] for w in mem["workers"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--populations", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--per-round", type=int, default=10, help="clients per round")
    args = ap.parse_args()
    results = {n: measure(n, args.rounds, args.per_round) for n in args.populations}
    base = sum(results[args.populations[0]].values())
    print(f"{'clients':>9} {'driver MiB':>11} {'server MiB':>11} {'workers MiB':>12} "
          f"{'total ratio':>12}")
    for n, r in results.items():
        print(f"{n:>9} {r['driver']:>11.0f} {r['server']:>11.0f} {r['workers']:>12.0f} "
              f"{sum(r.values()) / base:>12.3f}")


if __name__ == "__main__":
    main()

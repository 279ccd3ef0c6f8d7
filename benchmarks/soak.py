"""Soak: 1,000 rounds of a small model, watching the memory of every process.

A leak of even a few kB per round shows up as a slope over 1,000 rounds. The
run records the resident memory (RSS, MiB) of the driver, the server actor and
the worker actors every ``--every`` rounds (``memory_every``) and, with
checkpoints every 100 rounds and Gaussian DP on (so the accountant's ledger,
the noise streams and the checkpoint writer all take part), prints per process:
the memory at the first and last sample and the least-squares slope over the
second half of the run, in kB per round (the first rounds include warm-up:
graph tracing, allocator growth). About zero means no leak.

    uv run python benchmarks/soak.py [--rounds 1000] [--every 20] [--out soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

PROCESSES = {"driver": "mem_driver_mib", "server": "mem_server_mib",
             "workers (sum)": "mem_workers_mib"}


def slope_kib_per_round(rounds: np.ndarray, mib: np.ndarray) -> float:
    """Least-squares slope of memory against round number, in KiB per round."""
    return float(np.polyfit(rounds, mib, 1)[0] * 1024) if len(rounds) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    from fedsim.config import DPConfig, ModelConfig, RayConfig, ServerConfig, SimConfig
    from fedsim.simulation import run_simulation

    cfg = SimConfig(clients=100, clients_per_round=10, rounds=args.rounds, local_epochs=1,
                    eval_every=50, memory_every=args.every, checkpoint_every=100,
                    progress=False, model=ModelConfig(name="logreg"),
                    dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0),
                    server=ServerConfig(weighting="uniform"),
                    ray=RayConfig(num_cpus=2, workers=2))
    with tempfile.TemporaryDirectory() as tmp:
        res = run_simulation(cfg, tmp)
    rows = [r for r in res.metrics if "mem_driver_mib" in r]
    rounds = np.array([r["round"] for r in rows], float)
    half = rounds >= rounds[len(rounds) // 2]
    report = {"rounds": args.rounds, "wall_seconds": res.summary["wall_seconds"],
              "mean_round_seconds": res.summary["mean_round_seconds"], "processes": {}}
    print(f"{args.rounds} rounds in {res.summary['wall_seconds']:.0f} s "
          f"(final accuracy {res.summary['final']['eval_accuracy']:.3f}, "
          f"epsilon {res.summary['privacy']['epsilon']:.3g})")
    print(f"| process | MiB at round {int(rounds[0])} | MiB at round {int(rounds[-1])} "
          "| slope, 2nd half (KiB/round) |")
    print("| --- | --- | --- | --- |")
    for name, key in PROCESSES.items():
        mib = np.array([r[key] for r in rows])
        slope = slope_kib_per_round(rounds[half], mib[half])
        report["processes"][name] = {"first_mib": mib[0], "last_mib": mib[-1],
                                     "slope_kib_per_round": slope}
        print(f"| {name} | {mib[0]:.1f} | {mib[-1]:.1f} | {slope:+.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

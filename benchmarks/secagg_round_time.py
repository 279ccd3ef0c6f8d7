"""Round time with and without secure aggregation, side by side in one run.

A ~108k-parameter MLP (60 -> 1500 -> 10) on LEAF synthetic data, 2,000
clients, dp=gaussian, 1 local epoch at batch 20; for each cohort size the same
simulation runs with secagg none, secagg_plus and secagg. Prints the mean round
time (rounds after the first, which includes tracing) and the ratio to the
plain round. Full SecAgg is quadratic in the cohort: it is skipped above
--max-full-secagg clients.

    uv run python benchmarks/secagg_round_time.py [--cohorts 10 100 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def round_time(cohort: int, protocol: str, rounds: int) -> tuple[float, float]:
    from fedsim.config import (DataConfig, DPConfig, ModelConfig, RayConfig, SecAggConfig,
                               ServerConfig, SimConfig)
    from fedsim.simulation import run_simulation

    cfg = SimConfig(clients=2000, clients_per_round=cohort, rounds=rounds, local_epochs=1,
                    batch_size=20, progress=False, eval_every=rounds,
                    data=DataConfig(name="synthetic", test_clients=20),
                    model=ModelConfig(name="mlp", hidden=[1500]),
                    server=ServerConfig(weighting="uniform"),
                    dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0, l2_norm_clip=1.0),
                    secagg=SecAggConfig(protocol=protocol), ray=RayConfig(num_cpus=2))
    rows = run_simulation(cfg).metrics[1:]
    mean = sum(r["round_seconds"] for r in rows) / len(rows)
    sec = sum(r.get("secagg_seconds", 0.0) for r in rows) / len(rows)
    return mean, sec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-full-secagg", type=int, default=100)
    args = ap.parse_args()
    print(f"{'cohort':>7} {'protocol':>12} {'s/round':>9} {'of it key+unmask s':>19} "
          f"{'ratio to plain':>15}")
    for cohort in args.cohorts:
        plain, _ = round_time(cohort, "none", args.rounds)
        print(f"{cohort:>7} {'none':>12} {plain:>9.3f} {0.0:>19.3f} {1.0:>15.2f}", flush=True)
        for protocol in ("secagg_plus", "secagg"):
            if protocol == "secagg" and cohort > args.max_full_secagg:
                print(f"{cohort:>7} {protocol:>12} {'skipped (quadratic; --max-full-secagg)':>45}")
                continue
            t, sec = round_time(cohort, protocol, args.rounds)
            print(f"{cohort:>7} {protocol:>12} {t:>9.3f} {sec:>19.3f} {t / plain:>15.2f}",
                  flush=True)


if __name__ == "__main__":
    main()

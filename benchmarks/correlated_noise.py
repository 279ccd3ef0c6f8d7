"""Correlated-noise DP against DP-FedAvg at equal epsilon: the README's comparison.

The task: FedProx's Synthetic-IID population (``data=synthetic_iid``: one shared
labelling function, so a global model can learn it), 10,000 clients, 100 per
round, an MLP (two hidden layers of 200; ``--model logreg`` for softmax
regression), 1 local epoch at batch 10, client learning rate 0.1, server SGD
at learning rate 1, every update clipped to L2 norm 0.5 (the same clip for
every mechanism), 200 rounds, delta = clients^-1.1. The rows:

- ``dp_fedavg``: ``dp=gaussian`` with ``sampling=poisson`` (q = 0.01):
  independent noise each round, amplified by sampling (RDP);
- ``tree``: ``dp=tree_aggregation`` (DP-FTRL, TFF's efficient tree) with
  ``sampling=min_sep`` (100 fixed groups of 100 clients in turn, so a client is
  in every 100th round: 2 participations), the tree restarted every 100 rounds;
- ``banded_mf``: ``dp=banded_mf``, 100 bands, the same schedule;
- ``blt``: ``dp=blt``, 4 buffers, the same schedule;
- ``nonprivate``: no DP (the ceiling), uniform sampling.

Each private row's noise is calibrated to ``dp.target_epsilon`` for every
epsilon of ``--epsilons``. All runs share one Ray instance of 2 CPUs and one
:class:`fedsim.engine.warm.WarmActors`. Writes
``benchmarks/results/correlated_noise.{md,json}`` and
``docs/correlated_noise.png`` (test accuracy per round, one panel per epsilon)::

    uv run python benchmarks/correlated_noise.py [--epsilons 1 4 8] [--seeds 0]
        [--rounds 200] [--rows dp_fedavg tree banded_mf blt nonprivate]
    uv run python benchmarks/correlated_noise.py --combine a.json b.json  # one table of both
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from algorithms_noniid import fmt_std  # noqa: E402

ROWS = ("dp_fedavg", "tree", "banded_mf", "blt", "nonprivate")
COLORS = {"dp_fedavg": "tab:blue", "tree": "tab:orange", "banded_mf": "tab:green",
          "blt": "tab:red", "nonprivate": "black"}


def base_config(args: argparse.Namespace) -> Any:
    from fedsim.config import (
        ClientConfig,
        DataConfig,
        ModelConfig,
        RayConfig,
        ServerConfig,
        SimConfig,
    )

    return SimConfig(clients=args.clients, clients_per_round=args.clients_per_round,
                     rounds=args.rounds, local_epochs=1, batch_size=10,
                     eval_every=args.eval_every, checkpoint_every=0, progress=False,
                     data=DataConfig(name="synthetic", synthetic_iid=True),
                     model=ModelConfig(name=args.model),
                     client=ClientConfig(learning_rate=args.client_lr),
                     server=ServerConfig(weighting="uniform", learning_rate=args.server_lr),
                     ray=RayConfig(num_cpus=2))


def row_config(base: Any, row: str, epsilon: Optional[float], args: argparse.Namespace) -> Any:
    from fedsim.config import DPConfig, SamplingConfig

    rep = dataclasses.replace
    sep = SamplingConfig(scheme="min_sep", min_sep=args.clients // args.clients_per_round)
    dp = dict(l2_norm_clip=args.clip, target_epsilon=epsilon,
              strategy_cache=str(ROOT / "benchmarks" / "results" / "strategies"))
    if row == "nonprivate":
        return base
    if row == "dp_fedavg":
        return rep(base, sampling=SamplingConfig(scheme="poisson"),
                   dp=DPConfig(mechanism="gaussian", **dp))
    if row == "tree":
        return rep(base, sampling=sep, dp=DPConfig(mechanism="tree_aggregation",
                                                   restart_every=sep.min_sep, **dp))
    if row == "banded_mf":
        return rep(base, sampling=sep, dp=DPConfig(mechanism="banded_mf", bands=sep.min_sep,
                                                   **dp))
    if row == "blt":
        return rep(base, sampling=sep, dp=DPConfig(mechanism="blt", buffers=4, **dp))
    raise ValueError(row)


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| mechanism | epsilon | noise multiplier | final accuracy | best accuracy | "
             "server noise state (MiB) | s/round |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["row"], r["epsilon"]) for r in runs},
                  key=lambda k: (k[1] is None, k[1] or 0, ROWS.index(k[0])))
    for row, eps in keys:
        seeds = [r for r in runs if r["row"] == row and r["epsilon"] == eps]
        final = [r["final_accuracy"] for r in seeds]
        best = [r["best_accuracy"] for r in seeds]
        sec = statistics.median(s for r in seeds for s in r["round_seconds"][1:])
        z = seeds[0]["noise_multiplier"]
        lines.append(f"| {row} | {'-' if eps is None else f'{eps:g}'} | "
                     f"{'-' if z is None else f'{z:.4g}'} | {fmt_std(final)} | "
                     f"{fmt_std(best)} | {seeds[0]['noise_state_mib']:.3f} | {sec:.3f} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], epsilons: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(epsilons), figsize=(4.2 * len(epsilons), 4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, eps in zip(axes, epsilons):
        for row in ROWS:
            seeds = [r for r in runs if r["row"] == row
                     and (r["epsilon"] == eps or (row == "nonprivate"))]
            if not seeds:
                continue
            acc = np.array([[np.nan if a is None else a for a in r["accuracy"]] for r in seeds])
            x = np.array(seeds[0]["rounds"])
            ax.plot(x, np.nanmean(acc, axis=0), color=COLORS[row], label=row,
                    linestyle="--" if row == "nonprivate" else "-")
        ax.set_title(f"epsilon = {eps:g}", fontsize="medium")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize="small", loc="lower right")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--clients-per-round", type=int, default=100)
    p.add_argument("--client-lr", type=float, default=0.1)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--model", default="mlp", choices=("logreg", "mlp"))
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--tag", default="")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="write the table and plot of earlier runs' json files (run nothing)")
    args = p.parse_args()
    if args.combine:
        saved = [json.loads(Path(f).read_text()) for f in args.combine]
        runs = [r for one in saved for r in one["runs"]]
        seeds = sorted({r["seed"] for r in runs})
        write(runs, argparse.Namespace(**{**saved[0]["setting"], "seeds": seeds,
                                          "tag": args.tag}),
              sum(one["total_seconds"] for one in saved))
        return

    runs, total = run_rows(args, base_config(args), row_config, lambda run, result: {
        "noise_state_mib": result.summary["memory_mib"].get("aggregator_state_mib", 0.0)})
    write(runs, args, total)


def run_rows(args: argparse.Namespace, base: Any, configure: Callable[..., Any],
             extra: Callable[[dict[str, Any], Any], dict[str, Any]],
             after_each: Optional[Callable[[list[dict[str, Any]], float], None]] = None,
             ) -> tuple[list[dict[str, Any]], float]:
    """Every (seed, row, epsilon) of ``args`` run on one set of warm actors: the
    runs' records (accuracy per evaluation, epsilon spent, noise multiplier,
    times, plus ``extra(run, result)`` of the record so far and the
    :class:`fedsim.simulation.SimulationResult`) and the total seconds.
    ``configure(base, row, epsilon, args)`` makes a row's config;
    ``after_each(runs, seconds)`` is called after every run."""
    import ray

    from fedsim.config import RayConfig
    from fedsim.engine.ray_setup import connect_ray
    from fedsim.engine.warm import WarmActors
    from fedsim.simulation import run_simulation

    started = connect_ray(RayConfig(num_cpus=2))
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    try:
        with WarmActors() as actors:
            for seed in args.seeds:
                for row in args.rows:
                    for eps in ([None] if row == "nonprivate" else args.epsilons):
                        cfg = dataclasses.replace(configure(base, row, eps, args), seed=seed)
                        t0 = time.perf_counter()
                        result = run_simulation(cfg, actors=actors)
                        evals = [m for m in result.metrics if m.get("eval_accuracy") is not None]
                        acc = [m["eval_accuracy"] for m in evals]
                        privacy = result.summary.get("privacy") or {}
                        run = {"row": row, "epsilon": eps, "seed": seed,
                               "epsilon_spent": privacy.get("epsilon"),
                               "noise_multiplier": (privacy.get("noise_multiplier")
                                                    if eps is not None else None),
                               "rounds": [m["round"] for m in evals], "accuracy": acc,
                               "final_accuracy": acc[-1], "best_accuracy": max(acc),
                               "round_seconds": [m["round_seconds"] for m in result.metrics],
                               "setup_seconds": result.summary.get("setup_seconds"),
                               "wall_seconds": time.perf_counter() - t0}
                        run.update(extra(run, result))
                        runs.append(run)
                        print(f"seed {seed} {row:10s} eps {eps} spent {run['epsilon_spent']} "
                              f"z {run['noise_multiplier']} final {acc[-1]:.4f} "
                              f"({run['wall_seconds']:.0f} s)", flush=True)
                        if after_each is not None:
                            after_each(runs, time.perf_counter() - t_all)
    finally:
        if started:
            ray.shutdown()
    return runs, time.perf_counter() - t_all


def write(runs: list[dict[str, Any]], args: argparse.Namespace, total: float) -> None:
    """The table (markdown, json) and the plot of ``runs``."""
    suffix = f"_{args.tag}" if args.tag else ""
    setting = (f"Synthetic-IID, {args.clients} clients, {args.clients_per_round}/round, "
               f"{args.rounds} rounds, {args.model}, clip {args.clip}, seeds {args.seeds}")
    md = table(runs)
    print(f"\n{setting}\n\n{md}\n\ntotal {total:.0f} s")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"correlated_noise{suffix}.md").write_text(f"{setting}\n\n{md}\n")
    (out / f"correlated_noise{suffix}.json").write_text(json.dumps(
        {"setting": vars(args), "total_seconds": total, "runs": runs}, indent=1))
    plot(runs, args.epsilons, ROOT / "docs" / f"correlated_noise{suffix}.png", setting)


if __name__ == "__main__":
    main()

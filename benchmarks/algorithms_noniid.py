"""Every algorithm on one strongly non-IID task, over seeds: the README's results table.

The task: scikit-learn's bundled digits split over 100 clients by Dirichlet label
skew with alpha = 0.1 (most clients hold one or two classes), 10 clients per
round (uniform sampling), softmax regression (``model=logreg``), 5 local epochs
at batch 10 and client learning rate 0.05 (fedsim's defaults), 50 rounds,
evaluation of the global model on the central test split after every round.
Every row uses ``server.weighting=uniform`` (SCAFFOLD's and the robust
aggregators' setting), so that the rows differ only in the algorithm. The rows:

- ``fedavg``: FedAvg, server SGD at learning rate 1;
- ``fedprox``: FedProx with mu = 0.1;
- ``scaffold``: SCAFFOLD, option II (client momentum 0);
- ``mime_lite``: Mime-Lite with base-optimizer momentum 0.9 (its yaml's value);
- ``fedavg+adam``: FedAdam, server Adam at learning rate 0.01;
- ``fedavg+median``: FedAvg with the coordinate-wise median instead of the mean.

The hyperparameters were fixed once, before the seeds ran, and are the same for
every seed and every row (``--local-epochs`` and the others change them for a
whole invocation). All runs share one Ray instance of 2 CPUs and one
:class:`fedsim.engine.warm.WarmActors` (TensorFlow starts once).

Writes ``benchmarks/results/algorithms_noniid.{md,json}`` (the table; every
round's accuracy of every run) and ``docs/algorithms_noniid.png`` (mean test
accuracy per round over the seeds, the band min to max), or with ``--tag T``
``algorithms_noniid_T.*``::

    uv run python benchmarks/algorithms_noniid.py [--seeds 0 1 2 3 4] [--rounds 50]
        [--local-epochs 5] [--tag T]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("fedavg", "fedprox", "scaffold", "mime_lite", "fedavg+adam", "fedavg+median")
COLORS = {"fedavg": "tab:blue", "fedprox": "tab:orange", "scaffold": "tab:green",
          "mime_lite": "tab:red", "fedavg+adam": "tab:purple", "fedavg+median": "tab:brown"}


def base_config(args: argparse.Namespace) -> Any:
    """The shared task and hyperparameters (seed 0)."""
    from fedsim.config import (
        ClientConfig,
        DataConfig,
        ModelConfig,
        RayConfig,
        ServerConfig,
        SimConfig,
    )

    return SimConfig(clients=args.clients, clients_per_round=args.clients_per_round,
                     rounds=args.rounds, local_epochs=args.local_epochs, batch_size=10,
                     eval_every=1, checkpoint_every=0, progress=False,
                     data=DataConfig(name="digits", partition="dirichlet", alpha=args.alpha),
                     model=ModelConfig(name=args.model),
                     client=ClientConfig(learning_rate=args.client_lr, momentum=0.0),
                     server=ServerConfig(weighting="uniform"),
                     ray=RayConfig(num_cpus=2))


def row_config(base: Any, row: str, args: argparse.Namespace) -> Any:
    """``base`` with the algorithm (and server side) of ``row``."""
    from fedsim.config import AggregatorConfig, AlgorithmConfig

    rep = dataclasses.replace
    if row == "fedavg":
        return base
    if row == "fedprox":
        return rep(base, algorithm=AlgorithmConfig(name="fedprox", mu=args.mu))
    if row == "scaffold":
        return rep(base, algorithm=AlgorithmConfig(name="scaffold"))
    if row == "mime_lite":
        return rep(base, algorithm=AlgorithmConfig(name="mime_lite"),
                   client=rep(base.client, momentum=args.mime_momentum))
    if row == "fedavg+adam":
        return rep(base, server=rep(base.server, optimizer="adam",
                                    learning_rate=args.adam_lr))
    if row == "fedavg+median":
        return rep(base, aggregator=AggregatorConfig(kind="median"))
    raise ValueError(row)


def rounds_to(acc: list[float], target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches ``target``; None: never."""
    return next((i + 1 for i, a in enumerate(acc) if a is not None and a >= target), None)


def fmt_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def table(runs: dict[str, list[dict[str, Any]]], target: float) -> str:
    """The markdown table: one line per row, statistics over its seeds."""
    lines = ["| algorithm | final accuracy (mean ± std) | best accuracy (mean ± std) | "
             f"rounds to {target:.0%} (per seed) | s/round |",
             "| --- | --- | --- | --- | --- |"]
    for row, seeds in runs.items():
        final = [r["accuracy"][-1] for r in seeds]
        best = [max(a for a in r["accuracy"] if a is not None) for r in seeds]
        reach = ", ".join("-" if r["rounds_to_target"] is None else str(r["rounds_to_target"])
                          for r in seeds)
        sec = statistics.median(s for r in seeds for s in r["round_seconds"][1:])
        lines.append(f"| {row} | {fmt_std(final)} | {fmt_std(best)} | {reach} | {sec:.3f} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Mean test accuracy per round over the seeds, with the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row, seeds in runs.items():
        acc = np.array([[np.nan if a is None else a for a in r["accuracy"]] for r in seeds])
        x = np.arange(1, acc.shape[1] + 1)
        color = COLORS.get(row)
        ax.plot(x, acc.mean(axis=0), color=color, label=row)
        ax.fill_between(x, acc.min(axis=0), acc.max(axis=0), color=color, alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean over seeds; band: min-max)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--client-lr", type=float, default=0.05)
    p.add_argument("--model", default="logreg", choices=("logreg", "mlp"))
    p.add_argument("--mu", type=float, default=0.1, help="FedProx's proximal strength")
    p.add_argument("--mime-momentum", type=float, default=0.9)
    p.add_argument("--adam-lr", type=float, default=0.01)
    p.add_argument("--target", type=float, default=0.8, help="accuracy for 'rounds to'")
    p.add_argument("--tag", default="", help="suffix of the output names")
    args = p.parse_args()

    import ray

    from fedsim.config import RayConfig
    from fedsim.engine.ray_setup import connect_ray
    from fedsim.engine.warm import WarmActors
    from fedsim.simulation import run_simulation

    base = base_config(args)
    started = connect_ray(RayConfig(num_cpus=2))
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in args.rows}
    t_all = time.perf_counter()
    try:
        with WarmActors() as actors:
            for seed in args.seeds:  # seeds outermost: machine drift hits every row alike
                for row in args.rows:
                    cfg = dataclasses.replace(row_config(base, row, args), seed=seed)
                    t0 = time.perf_counter()
                    result = run_simulation(cfg, actors=actors)
                    acc = [m.get("eval_accuracy") for m in result.metrics]
                    run = {"seed": seed, "accuracy": acc,
                           "train_loss": [m.get("train_loss") for m in result.metrics],
                           "round_seconds": [m["round_seconds"] for m in result.metrics],
                           "rounds_to_target": rounds_to(acc, args.target),
                           "wall_seconds": time.perf_counter() - t0}
                    runs[row].append(run)
                    print(f"seed {seed} {row:14s} final {acc[-1]:.3f} best "
                          f"{max(a for a in acc if a is not None):.3f} "
                          f"({run['wall_seconds']:.1f} s)", flush=True)
    finally:
        if started:
            ray.shutdown()
    total = time.perf_counter() - t_all

    suffix = f"_{args.tag}" if args.tag else ""
    md = table(runs, args.target)
    setting = (f"digits, Dirichlet alpha={args.alpha}, {args.clients} clients, "
               f"{args.clients_per_round}/round, {args.model}, {args.local_epochs} local epochs, "
               f"client lr {args.client_lr}, seeds {args.seeds}")
    print(f"\n{setting}\n\n{md}\n\ntotal {total:.0f} s")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"algorithms_noniid{suffix}.md").write_text(f"{setting}\n\n{md}\n")
    (out / f"algorithms_noniid{suffix}.json").write_text(json.dumps(
        {"setting": vars(args), "total_seconds": total, "runs": runs}, indent=1))
    plot(runs, ROOT / "docs" / f"algorithms_noniid{suffix}.png", setting)


if __name__ == "__main__":
    main()

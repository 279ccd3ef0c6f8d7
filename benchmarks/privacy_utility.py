"""The privacy-utility headline: 1,000 of 100,000 clients per round, DP near non-private.

User-level DP needs large cohorts: the noise on the averaged update has std
``z * C / clients_per_round``. This runs FedProx's Synthetic-IID population
(``data=synthetic_iid``: one shared labelling function, so a global model can
learn it; every client generated from (seed, client id)), softmax regression
(``--model logreg``; ``mlp`` also works), 1 local epoch at batch 10, server
SGD, delta = clients^-1.1, and each private row calibrated to
``dp.target_epsilon`` for every epsilon of ``--epsilons``. The rows:

- ``nonprivate``: no DP, Poisson sampling (the ceiling);
- ``adaptive``: ``dp=gaussian_adaptive`` (TFF's adaptive clip, starting at
  ``--initial-clip``, aiming at the ``--quantile`` of the update norms) with ``sampling=poisson``
  (q = clients_per_round / clients), add/remove adjacency, RDP;
- ``dp_fedavg``: ``dp=gaussian`` with the fixed ``--clip``, the same sampling;
- ``banded_mf`` / ``blt`` / ``tree``: correlated noise (one file each in
  ``fedsim/privacy/mechanisms/``) with ``sampling=min_sep`` (clients //
  clients_per_round fixed groups in turn), the fixed ``--clip``, accounted
  without amplification for the client that participates most.

The table gives each row's final accuracy and its gap to the non-private run
in accuracy points; the plot (``docs/privacy_utility.png``) shows final
accuracy against epsilon, one line per mechanism, with the non-private run as
a horizontal line, and beside it the accuracy per round. All runs share one
Ray instance and one :class:`fedsim.engine.warm.WarmActors`::

    uv run python benchmarks/privacy_utility.py [--epsilons 1 2 8]
        [--rows nonprivate adaptive banded_mf blt] [--rounds 100] [--seeds 0]
    uv run python benchmarks/privacy_utility.py --combine a.json b.json   # one table of both

Each row is also one CLI command, printed in the table's last column.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import correlated_noise  # noqa: E402
from algorithms_noniid import fmt_std  # noqa: E402

ROWS = ("nonprivate", "adaptive", "dp_fedavg", "banded_mf", "blt", "tree")
COLORS = {"adaptive": "tab:purple", **correlated_noise.COLORS}
LABELS = {"adaptive": "gaussian_adaptive (Poisson)", "dp_fedavg": "gaussian (Poisson)",
          "banded_mf": "banded_mf (min_sep)", "blt": "blt (min_sep)",
          "tree": "tree_aggregation (min_sep)", "nonprivate": "non-private"}


def label(run: dict[str, Any]) -> str:
    """A run's line in the table and plot: its mechanism (and the adaptive row's
    target quantile when it is not TFF's 0.5)."""
    q = run.get("quantile", 0.5)
    if run["row"] == "adaptive" and q != 0.5:
        return f"gaussian_adaptive, quantile {q:g} (Poisson)"
    return LABELS[run["row"]]


def row_config(base: Any, row: str, epsilon: Optional[float], args: argparse.Namespace) -> Any:
    """The SimConfig of one row at one epsilon (None for the non-private row)."""
    from fedsim.config import DPConfig, SamplingConfig

    poisson = SamplingConfig(scheme="poisson")
    if row == "nonprivate":
        return dataclasses.replace(base, sampling=poisson)
    if row == "adaptive":
        return dataclasses.replace(base, sampling=poisson, dp=DPConfig(
            mechanism="gaussian_adaptive", target_epsilon=epsilon,
            initial_l2_norm_clip=args.initial_clip,
            target_unclipped_quantile=args.quantile))
    return correlated_noise.row_config(base, row, epsilon, args)


def command(row: str, epsilon: Optional[float], args: argparse.Namespace) -> str:
    """The scripts/simulate.py command line of one row (the same run, from the CLI)."""
    parts = ["uv run python scripts/simulate.py data=synthetic_iid",
             f"clients={args.clients} clients_per_round={args.clients_per_round}",
             f"rounds={args.rounds} model={args.model} local_epochs=1",
             f"client.learning_rate={args.client_lr:g} server.learning_rate={args.server_lr:g}",
             "server.weighting=uniform seed={seed}"]
    sep = args.clients // args.clients_per_round
    if row in ("nonprivate", "adaptive", "dp_fedavg"):
        parts.append("sampling=poisson")
    else:
        parts.append(f"sampling=min_sep sampling.min_sep={sep}")
    if row == "adaptive":
        parts.append(f"dp=gaussian_adaptive dp.initial_l2_norm_clip={args.initial_clip:g}")
        if args.quantile != 0.5:
            parts.append(f"dp.target_unclipped_quantile={args.quantile:g}")
    elif row == "dp_fedavg":
        parts.append("dp=gaussian")
    elif row == "banded_mf":
        parts.append(f"dp=banded_mf dp.bands={sep}")
    elif row == "blt":
        parts.append("dp=blt dp.buffers=4")
    elif row == "tree":
        parts.append(f"dp=tree_aggregation dp.restart_every={sep}")
    if row not in ("nonprivate", "adaptive"):
        parts.append(f"dp.l2_norm_clip={args.clip:g}")
    if epsilon is not None:
        parts.append(f"dp.target_epsilon={epsilon:g}")
    if args.vectorize:
        parts.append(f"client.vectorize={args.vectorize}")
    return " ".join(parts)


def table(runs: list[dict[str, Any]]) -> str:
    """One line per (mechanism, epsilon): final accuracy and its gap to the non-private run."""
    base = [r["final_accuracy"] for r in runs if r["row"] == "nonprivate"]
    ceiling = statistics.fmean(base) if base else None
    lines = ["| mechanism | epsilon | noise multiplier | final accuracy | "
             "gap to non-private (points) | s/round |",
             "| --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(label(r), r["row"], r["epsilon"]) for r in runs},
                  key=lambda k: (k[2] is not None, k[2] or 0, ROWS.index(k[1]), k[0]))
    for name, row, eps in keys:
        seeds = [r for r in runs if label(r) == name and r["epsilon"] == eps]
        final = [r["final_accuracy"] for r in seeds]
        sec = statistics.median(s for r in seeds for s in r["round_seconds"][1:])
        z = seeds[0]["noise_multiplier"]
        gap = ("-" if ceiling is None or row == "nonprivate"
               else f"{100 * (ceiling - statistics.fmean(final)):.1f}")
        lines.append(f"| {name} | {'-' if eps is None else f'{eps:g}'} | "
                     f"{'-' if z is None else f'{z:.4g}'} | {fmt_std(final)} | {gap} | "
                     f"{sec:.2f} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Final accuracy against epsilon (left) and accuracy per round at the smallest epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = [r for r in runs if r["row"] == "nonprivate"]
    if base:
        left.axhline(statistics.fmean(r["final_accuracy"] for r in base), color="black",
                     linestyle="--", label=LABELS["nonprivate"])
    eps_all = sorted({r["epsilon"] for r in runs if r["epsilon"] is not None})
    names = sorted({label(r) for r in runs if r["row"] != "nonprivate"})
    styles = {}
    for name in names:
        row = next(r["row"] for r in runs if label(r) == name)
        styles[name] = dict(color=COLORS[row], linestyle=":" if name != LABELS[row] else "-")
        pts = [(e, statistics.fmean(r["final_accuracy"] for r in runs
                                    if label(r) == name and r["epsilon"] == e))
               for e in eps_all if any(label(r) == name and r["epsilon"] == e for r in runs)]
        if pts:
            left.plot(*zip(*pts), marker="o", label=name, **styles[name])
    left.set_xscale("log")
    left.minorticks_off()
    left.set_xticks(eps_all, [f"{e:g}" for e in eps_all])
    left.set_xlabel("epsilon (delta = clients^-1.1)")
    left.set_ylabel("final test accuracy")
    left.grid(alpha=0.3)
    left.legend(fontsize="x-small", loc="lower right")
    if eps_all:
        low = eps_all[0]
        for name in [LABELS["nonprivate"], *names]:
            seeds = [r for r in runs if label(r) == name
                     and (r["epsilon"] == low or r["row"] == "nonprivate")]
            if not seeds:
                continue
            acc = np.array([[np.nan if a is None else a for a in r["accuracy"]] for r in seeds])
            style = styles.get(name, dict(color="black", linestyle="--"))
            right.plot(seeds[0]["rounds"], np.nanmean(acc, axis=0), label=name, **style)
        right.set_title(f"accuracy per round, epsilon = {low:g}", fontsize="medium")
        right.set_xlabel("round")
        right.grid(alpha=0.3)
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(runs: list[dict[str, Any]], args: argparse.Namespace, total: float) -> None:
    """The table (markdown, json) and the plot of ``runs``."""
    suffix = f"_{args.tag}" if args.tag else ""
    setting = (f"Synthetic-IID, {args.clients} clients, {args.clients_per_round}/round, "
               f"{args.rounds} rounds, {args.model}, seeds {sorted({r['seed'] for r in runs})}")
    md = table(runs)
    cmds = "\n".join(sorted({r["command"] for r in runs}))
    print(f"\n{setting}\n\n{md}\n\n{cmds}\n\ntotal {total:.0f} s")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"privacy_utility{suffix}.md").write_text(f"{setting}\n\n{md}\n\n```\n{cmds}\n```\n")
    (out / f"privacy_utility{suffix}.json").write_text(json.dumps(
        {"setting": vars(args), "total_seconds": total, "runs": runs}, indent=1))
    plot(runs, ROOT / "docs" / f"privacy_utility{suffix}.png", setting)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rows", nargs="+", default=["nonprivate", "adaptive", "banded_mf", "blt"],
                   choices=ROWS)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--clients", type=int, default=100_000)
    p.add_argument("--clients-per-round", type=int, default=1000)
    p.add_argument("--client-lr", type=float, default=0.1)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=0.5, help="the fixed clip of the non-adaptive "
                   "rows (the adaptive row starts at --initial-clip)")
    p.add_argument("--initial-clip", type=float, default=0.1)
    p.add_argument("--quantile", type=float, default=0.5,
                   help="the adaptive row's dp.target_unclipped_quantile (TFF's default 0.5)")
    p.add_argument("--model", default="logreg", choices=("logreg", "mlp"))
    p.add_argument("--vectorize", type=int, default=0, help="client.vectorize (0: the default)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--tag", default="")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="write the table and plot of earlier runs' json files (run nothing)")
    args = p.parse_args()
    if args.combine:
        saved = [json.loads(Path(f).read_text()) for f in args.combine]
        runs = [r for one in saved for r in one["runs"]]
        write(runs, argparse.Namespace(**{**saved[0]["setting"], "tag": args.tag}),
              sum(one["total_seconds"] for one in saved))
        return

    from fedsim.config import ClientConfig

    base = correlated_noise.base_config(args)
    if args.vectorize:
        base = dataclasses.replace(base, client=ClientConfig(learning_rate=args.client_lr,
                                                             vectorize=args.vectorize))
    runs, total = correlated_noise.run_rows(
        args, base, row_config,
        lambda run, result: {
            "quantile": args.quantile if run["row"] == "adaptive" else None,
            "command": command(run["row"], run["epsilon"], args).replace("{seed}",
                                                                          str(run["seed"]))},
        # what has run so far stays on disk if a later row fails or is killed
        after_each=lambda runs, seconds: write(runs, args, seconds))
    write(runs, args, total)


if __name__ == "__main__":
    main()

"""What a run leaves for people: per-round metrics, a summary, a plot, a progress bar.

In the run directory:

- ``metrics.jsonl``: one JSON object per round, appended and flushed as the
  round ends (``round``, ``train_loss``, ``eval_loss``, ``eval_accuracy``,
  ``clients``, ``round_seconds``, ...). ``eval_*`` are null in rounds without
  evaluation.
- ``summary.json``: written once, atomically, when the run ends: the resolved
  config, final metrics, wall time, versions, and ``status``. Its presence marks
  a finished run.
- ``metrics.png``: accuracy and loss per round.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append one JSON line per row to ``path`` (created if missing), flushed."""
    with open(path, "a") as f:
        f.writelines(json.dumps({k: _jsonable(v) for k, v in r.items()}, sort_keys=True) + "\n"
                     for r in rows)


def keep_rounds(path: Path, last_round: int) -> None:
    """Rewrite the JSON-lines file ``path`` (atomically) to hold only its rows of
    rounds ``<= last_round`` (a resumed run drops what came after its
    checkpoint); nothing happens if it does not exist."""
    if not path.exists():
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["round"] <= last_round]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON line per round to ``metrics.jsonl`` (created on first write).

    ``kept``: rows of an earlier part of the run (resuming from a checkpoint);
    the file is first rewritten, atomically, to hold exactly those.
    """

    def __init__(self, path: Path, kept: Iterable[Mapping[str, Any]] = ()) -> None:
        self.path = path
        self._file = None
        kept = list(kept)
        if kept:
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
            os.replace(tmp, path)
            self._file = open(path, "a")

    def write(self, row: Mapping[str, Any]) -> None:
        clean = {k: _jsonable(v) for k, v in row.items()}
        if self._file is None:
            self._file = open(self.path, "w")
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLog:
    """Per-round scalars as TensorBoard events (``tf.summary``) in ``log_dir``.

    Every numeric, finite value of a metrics row becomes a scalar at step
    ``round`` (e.g. ``eval_accuracy``, ``train_loss``, ``epsilon``). Imports
    TensorFlow, so the driver pays its start-up only when asked for
    (``tensorboard=true``). View with ``tensorboard --logdir <run dir>/tb``.
    """

    def __init__(self, log_dir: Path) -> None:
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(log_dir))

    def write(self, row: Mapping[str, Any]) -> None:
        with self._writer.as_default(step=int(row["round"])):
            for key, value in sorted(row.items()):
                if (key != "round" and isinstance(value, (int, float))
                        and not isinstance(value, bool) and math.isfinite(value)):
                    self._tf.summary.scalar(key, float(value))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def memory_mib() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MiB.

    The peak is Linux's ``VmHWM`` (of this process image; ``ru_maxrss`` would
    carry a parent's peak over ``exec``), else ``ru_maxrss``."""
    import resource

    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        pass
    return {"rss": psutil.Process().memory_info().rss / 2**20, "peak": peak}


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that determine the results."""
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("fedsim", "tensorflow", "ray", "numpy", "tensorflow-privacy",
                "dp-accounting", "hydra-core", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def summary_line(summary: Mapping[str, Any], output_dir: Any) -> str:
    """The one line a finished run prints: rounds, accuracy, epsilon(s), time, outputs."""
    privacy = summary["privacy"]
    spent = ("" if privacy["mechanism"] == "none" else
             f", epsilon {privacy['epsilon']:.4g} at delta {privacy['delta']:.3g}"
             if privacy["epsilon"] != "inf" else ", epsilon inf (no noise)")
    example = privacy.get("example_level")
    if example:
        eps = example["epsilon"]
        spent += (f", example-level epsilon {eps:.4g} at delta {example['delta']:.3g} "
                  "(DP-SGD, worst client)" if eps != "inf" else
                  ", example-level epsilon inf (DP-SGD without noise)")
    audit = summary.get("audit")
    if audit:
        ref = audit.get("accountant_epsilon_add_remove")
        ref = (f"; add/remove accountant {ref:.4g}" if isinstance(ref, float) else
               f"; add/remove accountant {ref}" if ref is not None else "")
        spent += f", canary-audit epsilon {audit['epsilon']:.3g} (empirical{ref})"
    primary = summary.get("primary_metric", "eval_accuracy")
    value = summary["final"].get(primary)
    fed = summary["final"].get("fed_" + primary[len("eval_"):] + "_p10")
    spent = (f", clients' 10th percentile {fed:.4f}" if fed is not None else "") + spent
    return (f"fedsim: {summary['rounds_completed']} rounds ({summary['stop_reason']}), test "
            f"{primary[len('eval_'):].replace('_', ' ')} "
            f"{value if value is not None else float('nan'):.4f}{spent}, "
            f"{summary['wall_seconds']:.1f} s; outputs in {output_dir}")


def plot_metrics(rows: Iterable[Mapping[str, Any]], path: Path, title: str = "",
                 audit_epsilon: Optional[float] = None, metric: str = "accuracy",
                 bounded: bool = True) -> None:
    """Save a PNG with the eval ``metric`` (accuracy), train/eval loss and (with
    DP) epsilon per round. With federated evaluation the metric's panel also
    shows the clients' weighted value, their 10th-90th percentile band and
    median, and the personalized median.

    ``audit_epsilon``: the canary audit's empirical estimate for the final model,
    drawn as a level beside the accountant's curve. ``bounded``: the metric lies
    in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    rounds = [r["round"] for r in rows]
    ev = [(r["round"], r.get(f"eval_{metric}"), r["eval_loss"]) for r in rows
          if r.get("eval_loss") is not None]
    fed = [(r["round"], r[f"fed_{metric}_p10"], r[f"fed_{metric}_p50"], r[f"fed_{metric}_p90"],
            r[f"fed_{metric}"]) for r in rows if r.get(f"fed_{metric}_p10") is not None]
    pers = [(r["round"], r[f"pers_{metric}_p50"]) for r in rows
            if r.get(f"pers_{metric}_p50") is not None]
    eps = [(r["round"], r.get("epsilon")) for r in rows if "epsilon" in r]
    panel = bool(eps) or audit_epsilon is not None
    fig, axes = plt.subplots(1, 3 if panel else 2, figsize=(16 if panel else 11, 4))
    ax_acc, ax_loss = axes[0], axes[1]
    if ev:
        ax_acc.plot([e[0] for e in ev], [e[1] for e in ev], marker=".", color="tab:blue",
                    label="central test split")
    if fed:
        r_, lo, mid, hi, weighted = zip(*fed)
        ax_acc.fill_between(r_, lo, hi, color="tab:green", alpha=0.2,
                            label="clients, 10th-90th percentile")
        ax_acc.plot(r_, mid, color="tab:green", label="clients, median")
        ax_acc.plot(r_, weighted, color="tab:green", linestyle=":", label="clients, weighted")
    if pers:
        ax_acc.plot([p[0] for p in pers], [p[1] for p in pers], color="tab:orange",
                    label="personalized, median")
    if fed or pers:
        ax_acc.legend(fontsize="small")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel(f"test {metric.replace('_', ' ')}")
    if bounded:
        ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(rounds, [r.get("train_loss") for r in rows], label="train (local steps)")
    if ev:
        ax_loss.plot([e[0] for e in ev], [e[2] for e in ev], label="test")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if panel:
        ax_eps = axes[2]
        finite = [(r, e) for r, e in eps if e is not None and math.isfinite(e)]
        if finite:
            ax_eps.plot([r for r, _ in finite], [e for _, e in finite], color="tab:red",
                        label="accountant (upper bound)")
        if audit_epsilon is not None:
            ax_eps.axhline(audit_epsilon, color="tab:purple", linestyle="--",
                           label=f"canary audit, final model: {audit_epsilon:.3g}")
            ax_eps.legend()
        elif not finite:
            ax_eps.text(0.5, 0.5, "epsilon = inf (no noise)", ha="center",
                        transform=ax_eps.transAxes)
        delta = next((r.get("delta") for r in rows if r.get("delta") is not None), None)
        ax_eps.set_xlabel("round")
        ax_eps.set_ylabel("epsilon spent" + (f" (delta={delta:.2g})" if delta else ""))
        ax_eps.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class Progress:
    """A console progress bar over rounds showing the latest accuracy (stderr)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="round", dynamic_ncols=True, file=sys.stderr)

    def update(self, row: Mapping[str, Any]) -> None:
        if self._bar is None:
            return
        post = {"loss": f"{row['train_loss']:.3f}" if row.get("train_loss") is not None else "-"}
        if row.get("eval_accuracy") is not None:
            post["acc"] = f"{row['eval_accuracy']:.3f}"
        if "epsilon" in row:
            eps = row["epsilon"]
            post["eps"] = f"{eps:.3g}" if eps is not None and math.isfinite(eps) else "inf"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

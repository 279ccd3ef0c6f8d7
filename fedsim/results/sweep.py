"""Reports for people: a Hydra multirun grid summarised, or one run re-plotted.

A sweep directory (``multirun/<date>/<time>/``) holds one job directory per grid
point (``0/``, ``1/``, ... with ``.hydra/overrides.yaml``) and Hydra's
``multirun.yaml``. :func:`write_sweep_report` writes into it:

- ``sweep_points.csv``: one row per grid point (see :func:`collect_runs`);
- ``sweep_summary.csv``: one row per parameter combination, mean and sample
  standard deviation over the seeds (see :func:`summarize`);
- ``sweep_summary.md``: both as markdown tables, and the privacy cost of the
  whole search when its points ran with DP (:func:`search_privacy_lines`,
  :mod:`fedsim.privacy.tuning`);
- ``privacy_utility.png``: test accuracy against epsilon, one series per DP
  mechanism, error bars over the seeds; runs without DP and runs with
  epsilon = inf (no noise) sit on their own markers to the right.

Points that failed, stopped early or never started are listed with their status,
never dropped. For one run directory, :func:`write_run_report` redraws
``metrics.png`` from ``metrics.jsonl`` (with :func:`fedsim.results.outputs.plot_metrics`)
and writes ``run_summary.md``. :class:`SweepSummaryCallback` (registered in
``conf/config.yaml``) writes the sweep report at the end of every ``-m`` run;
``scripts/report.py`` regenerates either report by hand.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from hydra.experimental.callback import Callback

from fedsim.errors import FedsimError
from fedsim.results.outputs import plot_metrics, read_metrics

CHECKPOINT = "checkpoint.json"  # fedsim.results.checkpoint.CHECKPOINT (not imported: light)
TRACKING_STORE = "mlruns"  # fedsim.results.tracking.STORE (not imported: light)

# Statuses of a grid point.
COMPLETED = "completed"
INCOMPLETE = "incomplete"    # has rounds in metrics.jsonl but no summary.json
FAILED = "failed"            # has a job directory but not a single round
NOT_STARTED = "not started"  # in the grid (multirun.yaml) but without a job directory
UNREADABLE = "unreadable"    # its summary.json, metrics.jsonl or .hydra files cannot be parsed

# Override keys shown through the mechanism / noise_multiplier / seed columns instead.
_SHOWN_AS_COLUMNS = ("dp", "dp.noise_multiplier", "seed")
_RUN_FILES = ("summary.json", "metrics.jsonl")


# ---------------------------------------------------------------------------- reading runs

def _read_yaml(path: Path) -> Any:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """Hydra override strings as ``{key: value}`` (values as written)."""
    out: dict[str, str] = {}
    for o in overrides:
        key, _, value = str(o).partition("=")
        out[key.lstrip("+~")] = value
    return out


def _epsilon(value: Any) -> Optional[float]:
    """summary.json's privacy.epsilon (a float, ``"inf"`` or null) as a float or None."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> Optional[float]:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _point_from_config(row: dict[str, Any], config: Mapping[str, Any]) -> None:
    dp = config.get("dp") or {}
    row["mechanism"] = dp.get("mechanism")
    row["noise_multiplier"] = (_float(dp.get("noise_multiplier"))
                               if dp.get("mechanism") not in (None, "none") else None)
    row["seed"] = config.get("seed")


def _point_from_overrides(row: dict[str, Any]) -> None:
    ov = row["overrides"]
    row["mechanism"] = ov.get("dp")
    row["noise_multiplier"] = _float(ov.get("dp.noise_multiplier"))
    seed = ov.get("seed")
    row["seed"] = int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed


def _empty_row(point: str, run_dir: Optional[Path], overrides: Sequence[str]) -> dict[str, Any]:
    return {"point": point, "dir": str(run_dir) if run_dir is not None else None,
            "status": NOT_STARTED, "overrides": parse_overrides(overrides),
            "override_list": [str(o) for o in overrides], "mechanism": None,
            "noise_multiplier": None, "seed": None, "rounds_completed": None,
            "accuracy": None, "epsilon": None, "wall_seconds": None, "note": ""}


def read_run(run_dir: Path, point: Optional[str] = None) -> dict[str, Any]:
    """One run directory as a row: status, overrides, DP parameters and results.

    ``status``: ``completed`` (or whatever summary.json says) when summary.json
    exists; ``incomplete`` with rounds in metrics.jsonl but no summary.json (the
    run was killed, crashed or is still running); ``failed`` with neither;
    ``unreadable`` when its files cannot be parsed.
    """
    import yaml

    try:
        return _read_run(Path(run_dir), point)
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError) as err:
        row = _empty_row(point if point is not None else Path(run_dir).name, Path(run_dir), [])
        first = (str(err).splitlines() or [type(err).__name__])[0]
        row.update(status=UNREADABLE, note=f"{type(err).__name__}: {first}")
        return row


def _read_run(run_dir: Path, point: Optional[str]) -> dict[str, Any]:
    hydra_dir = run_dir / ".hydra"
    overrides: list[str] = []
    if (hydra_dir / "overrides.yaml").is_file():
        overrides = [str(o) for o in (_read_yaml(hydra_dir / "overrides.yaml") or [])]
    row = _empty_row(point if point is not None else run_dir.name, run_dir, overrides)
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if summary_path.is_file():
        summary = _read_json(summary_path)
        _point_from_config(row, summary.get("config") or {})
        privacy = summary.get("privacy") or {}
        row.update(status=summary.get("status", COMPLETED),
                   rounds_completed=summary.get("rounds_completed"),
                   accuracy=_float((summary.get("final") or {}).get("eval_accuracy")),
                   epsilon=_epsilon(privacy.get("epsilon")),
                   wall_seconds=_float(summary.get("wall_seconds")))
        reason = str(summary.get("stop_reason") or "")
        if reason and not reason.startswith("reached rounds"):
            row["note"] = reason
        return row
    if (hydra_dir / "config.yaml").is_file():
        _point_from_config(row, _read_yaml(hydra_dir / "config.yaml") or {})
    else:
        _point_from_overrides(row)
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    if not metrics:
        row.update(status=FAILED, note="no metrics.jsonl: it failed before its first round "
                                       "(see the sweep's output), or is still starting")
        return row
    evaluated = [m for m in metrics if m.get("eval_accuracy") is not None]
    last = metrics[-1]
    row.update(status=INCOMPLETE, rounds_completed=len(metrics),
               accuracy=_float(evaluated[-1]["eval_accuracy"]) if evaluated else None,
               epsilon=(_float(last["epsilon"]) if last.get("epsilon") is not None else math.inf)
               if "epsilon" in last else None,
               note=f"no summary.json: stopped after round {last.get('round')} (killed, "
                    "crashed or still running)"
                    + (f"; continue with resume={run_dir}"
                       if (run_dir / CHECKPOINT).is_file() else ""))
    return row


def is_run_dir(path: Path) -> bool:
    """A single run's directory: it has summary.json or metrics.jsonl, or Hydra's
    record of a run (``.hydra/config.yaml``) and is not a sweep directory."""
    path = Path(path)
    if any((path / f).is_file() for f in _RUN_FILES):
        return True
    return (path / ".hydra" / "config.yaml").is_file() and not (path / "multirun.yaml").is_file()


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories under a sweep directory, in natural order (2 before 10)."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    for name in _RUN_FILES:
        found |= {p.parent for p in sweep_dir.rglob(name)}
    found.discard(sweep_dir)
    # the MLflow file store of tracking=mlflow holds copies of summary.json as artifacts
    found = {p for p in found if TRACKING_STORE not in p.relative_to(sweep_dir).parts}
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def expected_points(sweep_dir: Path) -> Optional[list[list[str]]]:
    """The grid Hydra's basic sweeper expands from ``multirun.yaml``, in job order.

    None when there is no multirun.yaml, another sweeper was used, or it cannot be
    expanded; then the report lists the job directories it finds.
    """
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        hydra_cfg = (_read_yaml(path) or {}).get("hydra", {})
        if not str((hydra_cfg.get("sweeper") or {}).get("_target_", "")).endswith("BasicSweeper"):
            return None
        params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
        args = [f"{k}={v}" for k, v in params.items()]
        args += [str(o) for o in (hydra_cfg.get("overrides") or {}).get("task") or []]
        parsed = OverridesParser.create().parse_overrides(args)
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - a grid we cannot expand is listed from its directories
        return None


def collect_runs(path: os.PathLike | str) -> list[dict[str, Any]]:
    """One row per grid point of a sweep directory (or the one row of a run directory).

    Each row: ``point`` (the job directory relative to the sweep, or ``#n`` for a
    point that never started), ``dir``, ``status`` (``completed``, ``incomplete``,
    ``failed``, ``not started``), ``overrides`` (``{key: value}`` as given to
    Hydra), ``override_list``, ``mechanism``, ``noise_multiplier``, ``seed``,
    ``rounds_completed``, ``accuracy`` (final test accuracy), ``epsilon`` (float,
    ``math.inf`` for no noise, None without DP), ``wall_seconds``, ``note``.
    """
    root = check_report_dir(path)
    if is_run_dir(root):
        return [read_run(root, point=".")]
    rows = [read_run(d, point=d.relative_to(root).as_posix()) for d in job_dirs(root)]
    expected = expected_points(root)
    if expected is None:
        return rows
    unmatched = list(rows)
    ordered: list[dict[str, Any]] = []
    for num, job in enumerate(expected):
        match = next((r for r in unmatched if r["override_list"] == job), None)
        if match is None:
            row = _empty_row(f"#{num}", None, job)
            _point_from_overrides(row)
            row["note"] = "no job directory: the sweep stopped before this point"
            ordered.append(row)
        else:
            unmatched.remove(match)
            ordered.append(match)
    # A job directory the expansion does not account for: trust the directories only.
    return rows if unmatched else ordered


def check_report_dir(path: os.PathLike | str) -> Path:
    """The directory, if it is a run or sweep directory; else a one-line FedsimError."""
    root = Path(path)
    if not root.exists():
        raise FedsimError(f"{root}: no such directory")
    if not root.is_dir():
        raise FedsimError(f"{root}: not a directory")
    if not (is_run_dir(root) or (root / "multirun.yaml").is_file() or job_dirs(root)):
        raise FedsimError(f"{root}: not a fedsim run or sweep directory (no summary.json, "
                          "metrics.jsonl, multirun.yaml or job directories in it)")
    return root


# ---------------------------------------------------------------------------- summarising

def _mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None below 2 values); inf if any is inf."""
    if not values:
        return None, None
    if any(math.isinf(v) for v in values):
        return math.inf, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _group_key(row: Mapping[str, Any], excluded: Sequence[str]) -> tuple:
    if row.get("overrides"):
        return tuple((k, v) for k, v in row["overrides"].items() if k not in excluded)
    # Runs without Hydra overrides: group by what the configs say.
    return (("mechanism", row.get("mechanism")), ("noise_multiplier", row.get("noise_multiplier")))


def _status_text(rows: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    done = counts.pop(COMPLETED, 0)
    parts = [f"{done}/{len(rows)} completed"] + [f"{n} {s}" for s, n in counts.items()]
    return ", ".join(parts)


def _first_known(rows: Sequence[Mapping[str, Any]], key: str) -> Any:
    return next((r[key] for r in rows if r.get(key) is not None), None)


def summarize(rows: Sequence[Mapping[str, Any]],
              group_by_except: Sequence[str] = ("seed",)) -> list[dict[str, Any]]:
    """Mean and std over ``group_by_except`` (the seeds) for every other combination.

    Rows are grouped by their overrides without the keys in ``group_by_except``
    (rows without overrides: by mechanism and noise multiplier), in the order the
    groups first appear. Only completed points enter the means; every point is
    counted in ``n`` and ``status`` (e.g. ``1/2 completed, 1 failed``). Each group:
    ``params`` (the grouping overrides), ``mechanism``, ``noise_multiplier``, ``n``,
    ``completed``, ``seeds``, ``accuracy_mean``, ``accuracy_std``, ``epsilon_mean``,
    ``epsilon_std``, ``wall_seconds_mean``, ``status``. Std is the sample standard
    deviation (None with fewer than 2 completed points); an inf epsilon gives
    ``epsilon_mean = inf``; no DP gives None.
    """
    excluded = tuple(group_by_except)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group_key(row, excluded), []).append(row)
    out = []
    for key, members in groups.items():
        done = [r for r in members if r["status"] == COMPLETED]
        acc_mean, acc_std = _mean_std([r["accuracy"] for r in done if r["accuracy"] is not None])
        eps_mean, eps_std = _mean_std([r["epsilon"] for r in done if r["epsilon"] is not None])
        wall_mean, _ = _mean_std([r["wall_seconds"] for r in done if r["wall_seconds"] is not None])
        out.append({
            "params": dict(key) if members[0].get("overrides") else {},
            "mechanism": _first_known(done + members, "mechanism"),
            "noise_multiplier": _first_known(done + members, "noise_multiplier"),
            "n": len(members), "completed": len(done),
            "seeds": [r.get("seed") for r in members],
            "accuracy_mean": acc_mean, "accuracy_std": acc_std,
            "epsilon_mean": eps_mean, "epsilon_std": eps_std,
            "wall_seconds_mean": wall_mean, "status": _status_text(members),
        })
    return out


def varying_keys(dicts: Sequence[Mapping[str, Any]], skip: Sequence[str] = ()) -> list[str]:
    """Keys whose value differs between the dicts (or is missing from some), in order."""
    keys: list[str] = []
    for d in dicts:
        keys += [k for k in d if k not in keys and k not in skip]
    return [k for k in keys if len({repr(d.get(k, "<unset>")) for d in dicts}) > 1]


def common_overrides(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Overrides shared by every grid point, as ``key=value``."""
    if not rows:
        return []
    varying = set(varying_keys([r["overrides"] for r in rows]))
    return [f"{k}={v}" for k, v in rows[0]["overrides"].items() if k not in varying]


# ---------------------------------------------------------------------------- writing

def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else format(value, spec)
    return str(value)


def _fmt_mean_std(mean: Optional[float], std: Optional[float], spec: str,
                  show_zero_std: bool = True) -> str:
    if mean is None:
        return "-"
    if std is None or (std == 0 and not show_zero_std):
        return _fmt(mean, spec)
    return f"{_fmt(mean, spec)} ± {_fmt(std, spec)}"


def _epsilon_text(mechanism: Optional[str], eps: Optional[float], std: Optional[float]) -> str:
    if mechanism in (None, "none") and eps is None:
        return "- (no DP)" if mechanism == "none" else "-"
    return _fmt_mean_std(eps, std, ".4g", show_zero_std=False)  # same accounting, same epsilon


def _markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return value


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel jobs may write too
    tmp.write_text(text)
    os.replace(tmp, path)


def points_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and raw values of the per-point table (CSV and markdown)."""
    keys = varying_keys([r["overrides"] for r in rows], skip=_SHOWN_AS_COLUMNS)
    header = ["point", "status", *keys, "mechanism", "noise_multiplier", "seed",
              "rounds_completed", "accuracy", "epsilon", "wall_seconds", "note", "dir"]
    body = [[r["point"], r["status"], *[r["overrides"].get(k) for k in keys], r["mechanism"],
             r["noise_multiplier"], r["seed"], r["rounds_completed"], r["accuracy"],
             r["epsilon"], r["wall_seconds"], r["note"], r["dir"]] for r in rows]
    return header, body


def groups_table(groups: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and raw values of the per-group summary table (CSV)."""
    keys = varying_keys([g["params"] for g in groups], skip=_SHOWN_AS_COLUMNS)
    header = [*keys, "mechanism", "noise_multiplier", "n", "completed", "seeds",
              "accuracy_mean", "accuracy_std", "epsilon_mean", "epsilon_std",
              "wall_seconds_mean", "status"]
    body = [[*[g["params"].get(k) for k in keys], g["mechanism"], g["noise_multiplier"],
             g["n"], g["completed"], g["seeds"], g["accuracy_mean"], g["accuracy_std"],
             g["epsilon_mean"], g["epsilon_std"], g["wall_seconds_mean"], g["status"]]
            for g in groups]
    return header, body


def write_csv(header: Sequence[str], body: Iterable[Sequence[Any]], path: Path) -> None:
    """A CSV file (inf as ``inf``, None as an empty cell), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([[_csv_value(v) for v in row] for row in body])
    _write_text_atomic(Path(path), buf.getvalue())


def summary_markdown(rows: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]],
                     title: str, group_by_except: Sequence[str] = ("seed",)) -> str:
    """The sweep report as markdown: grouped means ± std, then every grid point."""
    done = sum(r["status"] == COMPLETED for r in rows)
    keys = varying_keys([g["params"] for g in groups], skip=_SHOWN_AS_COLUMNS)
    over = " and ".join(group_by_except) or "nothing"
    lines = [f"# {title}", "",
             f"{len(rows)} grid point{'s' * (len(rows) != 1)} ({done} completed), "
             f"{len(groups)} group{'s' * (len(groups) != 1)}; "
             f"mean ± sample std over {over}."]
    common = common_overrides(rows)
    if common:
        lines += ["", "Common overrides: `" + " ".join(common) + "`"]
    header = [*keys, "mechanism", "z", "n", "seeds", "test accuracy", "epsilon", "wall s",
              "status"]
    body = [[*[_fmt(g["params"].get(k)) for k in keys], _fmt(g["mechanism"]),
             _fmt(g["noise_multiplier"], "g"), str(g["n"]),
             ", ".join(_fmt(s) for s in g["seeds"]),
             _fmt_mean_std(g["accuracy_mean"], g["accuracy_std"], ".4f"),
             _epsilon_text(g["mechanism"], g["epsilon_mean"], g["epsilon_std"]),
             _fmt(g["wall_seconds_mean"], ".1f"), g["status"]] for g in groups]
    lines += ["", _markdown_table(header, body), ""]
    lines += search_privacy_lines(rows)
    lines += ["## Grid points", ""]
    pkeys = varying_keys([r["overrides"] for r in rows], skip=_SHOWN_AS_COLUMNS)
    pheader = ["point", *pkeys, "mechanism", "z", "seed", "status", "rounds",
               "test accuracy", "epsilon", "wall s", "note"]
    pbody = [[r["point"], *[_fmt(r["overrides"].get(k)) for k in pkeys], _fmt(r["mechanism"]),
              _fmt(r["noise_multiplier"], "g"), _fmt(r["seed"]), r["status"],
              _fmt(r["rounds_completed"]), _fmt(r["accuracy"], ".4f"),
              _epsilon_text(r["mechanism"], r["epsilon"], None),
              _fmt(r["wall_seconds"], ".1f"), r["note"]] for r in rows]
    lines += [_markdown_table(pheader, pbody), ""]
    return "\n".join(lines)


def _sweeper(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The sweeper's and its sampler's class names, from a job's ``.hydra/hydra.yaml``."""
    for r in rows:
        path = Path(str(r["dir"])) / ".hydra" / "hydra.yaml" if r["dir"] else None
        if path is not None and path.is_file():
            sweeper = ((_read_yaml(path) or {}).get("hydra") or {}).get("sweeper") or {}
            sampler = sweeper.get("sampler") or {}
            return (str(sweeper.get("_target_", "")).rsplit(".", 1)[-1],
                    str(sampler.get("_target_", "")).rsplit(".", 1)[-1]
                    if isinstance(sampler, Mapping) else "")
    return "", ""


def search_privacy_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``## Privacy of the search`` (markdown lines; none for a sweep without DP):
    the epsilon of all the trials together (:mod:`fedsim.privacy.tuning`), which
    bound applies to this sweep, and why."""
    from fedsim.privacy.tuning import search_privacy

    private = [r for r in rows if r["mechanism"] not in (None, "none")]
    if not private:
        return []
    lines = ["## Privacy of the search", ""]
    if any(r["mechanism"] == "none" and r["status"] == COMPLETED for r in rows):
        return lines + ["A trial without DP trained on the population: the search as a "
                        "whole is not private (epsilon = inf).", ""]
    done = [r for r in private if r["status"] == COMPLETED and r["dir"]]
    uncounted = len([r for r in private if r["status"] != COMPLETED and r["rounds_completed"]])
    try:
        tp = search_privacy([_read_json(Path(str(r["dir"])) / "summary.json") for r in done])
    except (FedsimError, OSError, ValueError, KeyError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return lines + [f"No epsilon for the search: {first}", ""]
    sweeper, sampler = _sweeper(done)
    how = (f"a fixed grid of {tp.trials} points" if sweeper == "BasicSweeper" else
           f"a fixed number of trials (hydra.sweeper.n_trials) of {sampler}"
           if sampler == "RandomSampler" else
           f"an adaptive search ({sampler or sweeper or 'unknown sweeper'}: each trial's "
           "hyperparameters depend on earlier results)")
    eps_ps = tp.repeat_and_select_epsilon
    assert eps_ps is not None  # (computed for every list of trials)
    lines += [f"The {tp.trials} trials train on the same private population, so the search "
              f"spends more than any one trial (relation {tp.relation}, RDP accountant, "
              f"delta = {tp.delta:.3g}).", "",
              _markdown_table(
                  ["bound", "epsilon", "holds when"],
                  [[f"composition of all {tp.trials} trials (ComposedDpEvent)",
                    _fmt(tp.composed_epsilon), "always; every trial's result may be released "
                    "(as this report does)"],
                   [f"repeat and select (Papernot-Steinke; RepeatAndSelectDpEvent, "
                    f"geometric number of trials, mean {tp.mean_trials:g})",
                    _fmt(eps_ps) + (f" ({tp.note})" if tp.note else ""),
                    "the number of trials was drawn at random (geometric, that mean), the "
                    "trials were independent (random search) and only the best trial's "
                    "result is released"]]), "",
              f"This sweep was {how} and reports every trial, so the composition applies: "
              f"**epsilon = {_fmt(tp.composed_epsilon)} at delta = {tp.delta:.3g}** for the "
              "whole search."]
    if uncounted:
        lines += ["", f"{uncounted} trial{'s' * (uncounted != 1)} without summary.json ran "
                  "rounds that are not counted: the search spent more."]
    return lines + [""]


def _plot_category(group: Mapping[str, Any]) -> str:
    if group["mechanism"] in (None, "none") or group["epsilon_mean"] is None:
        return "no DP"
    return "ε = ∞" if math.isinf(group["epsilon_mean"]) else "finite"


def plot_privacy_utility(groups: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Save a PNG of test accuracy against epsilon: one series per mechanism, error
    bars over the seeds. Groups without DP, or with epsilon = inf (no noise), sit on
    their own markers in a narrow panel on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [g for g in groups if g["accuracy_mean"] is not None]
    finite = [g for g in shown if _plot_category(g) == "finite"]
    others = [g for g in shown if _plot_category(g) != "finite"]
    categories = [c for c in ("ε = ∞", "no DP") if any(_plot_category(g) == c for g in others)]
    if others:
        fig, (ax, ax_inf) = plt.subplots(1, 2, sharey=True, figsize=(9, 4.5),
                                         gridspec_kw={"width_ratios": [5, 0.8 * len(categories)]})
    else:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        ax_inf = None
    mechanisms = list(dict.fromkeys(str(g["mechanism"]) for g in shown))
    style = {m: dict(color=f"C{i}", marker="osD^v<>ph*"[i % 10], capsize=4)
             for i, m in enumerate(mechanisms)}
    for mech in mechanisms:
        pts = sorted((g for g in finite if str(g["mechanism"]) == mech),
                     key=lambda g: g["epsilon_mean"])
        if pts:
            ax.errorbar([g["epsilon_mean"] for g in pts], [g["accuracy_mean"] for g in pts],
                        yerr=[g["accuracy_std"] or 0.0 for g in pts],
                        xerr=[g["epsilon_std"] or 0.0 for g in pts], linestyle="-",
                        label=mech, **style[mech])
            for g in pts:
                if g["noise_multiplier"] is not None:
                    ax.annotate(f"z={g['noise_multiplier']:g}",
                                (g["epsilon_mean"], g["accuracy_mean"]),
                                textcoords="offset points", xytext=(5, 6), fontsize=8)
        for g in (g for g in others if str(g["mechanism"]) == mech):
            assert ax_inf is not None
            ax_inf.errorbar([categories.index(_plot_category(g))], [g["accuracy_mean"]],
                            yerr=[g["accuracy_std"] or 0.0], label=None if pts else mech,
                            **style[mech])
    eps_values = [g["epsilon_mean"] for g in finite]
    if eps_values and min(eps_values) > 0 and max(eps_values) / min(eps_values) > 20:
        ax.set_xscale("log")
    if not finite:
        ax.text(0.5, 0.5, "no finite epsilon in this sweep", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax.margins(x=0.15)
    ax.set_xlabel("epsilon spent (mean over seeds)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    axes = [ax]
    if ax_inf is not None:
        ax_inf.set_xlim(-0.6, len(categories) - 0.4)
        ax_inf.set_xticks(range(len(categories)), categories)
        ax_inf.grid(alpha=0.3)
        ax_inf.set_title("no privacy", fontsize=9)
        axes.append(ax_inf)
    handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
    labels = [lb for a in axes for lb in a.get_legend_handles_labels()[1]]
    if handles:
        ax.legend(handles, labels, title="dp mechanism", loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_sweep_report(sweep_dir: os.PathLike | str,
                       group_by_except: Sequence[str] = ("seed",)) -> str:
    """Write sweep_points.csv, sweep_summary.csv, sweep_summary.md and
    privacy_utility.png into the sweep directory; returns the markdown."""
    root = check_report_dir(sweep_dir)
    rows = collect_runs(root)
    groups = summarize(rows, group_by_except)
    write_csv(*points_table(rows), root / "sweep_points.csv")
    write_csv(*groups_table(groups), root / "sweep_summary.csv")
    text = summary_markdown(rows, groups, f"Sweep {root}", group_by_except)
    _write_text_atomic(root / "sweep_summary.md", text)
    plot_privacy_utility(groups, root / "privacy_utility.png", title=f"Privacy and utility: {root}")
    return text


def _sampled_rounds(n: int, most: int = 20) -> list[int]:
    """Indices of at most ``most`` (+1) rows, evenly spaced, always with the last."""
    step = max(1, math.ceil(n / most))
    idx = list(range(step - 1, n, step)) if step > 1 else list(range(n))
    if n and idx[-1] != n - 1:
        idx.append(n - 1)
    return idx


def write_run_report(run_dir: os.PathLike | str) -> str:
    """Redraw metrics.png from metrics.jsonl and write run_summary.md; returns the markdown."""
    root = check_report_dir(run_dir)
    if not is_run_dir(root):
        raise FedsimError(f"{root}: a sweep directory, not a run directory")
    row = read_run(root, point=".")
    if row["status"] == UNREADABLE:
        raise FedsimError(f"{root}: not a readable fedsim run ({row['note']})")
    metrics_path = root / "metrics.jsonl"
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    lines = [f"# Run {root}", ""]
    if row["overrides"]:
        lines += ["Overrides: `" + " ".join(row["override_list"]) + "`", ""]
    lines += [_markdown_table(
        ["status", "mechanism", "z", "seed", "rounds", "test accuracy", "epsilon", "wall s",
         "note"],
        [[row["status"], _fmt(row["mechanism"]), _fmt(row["noise_multiplier"], "g"),
          _fmt(row["seed"]), _fmt(row["rounds_completed"]), _fmt(row["accuracy"], ".4f"),
          _epsilon_text(row["mechanism"], row["epsilon"], None), _fmt(row["wall_seconds"], ".1f"),
          row["note"]]]), ""]
    if metrics:
        title = f"{root.name}: dp={row['mechanism']}" if row["mechanism"] else root.name
        plot_metrics(metrics, root / "metrics.png", title=title)
        has_eps = any("epsilon" in m for m in metrics)
        idx = _sampled_rounds(len(metrics))
        lines += ["## Rounds" + ("" if len(idx) == len(metrics) else
                                 f" (every {math.ceil(len(metrics) / 20)}th, and the last)"), ""]
        header = ["round", "train loss", "test loss", "test accuracy"] + (
            ["epsilon"] if has_eps else []) + ["round s"]
        body = [[_fmt(m.get("round")), _fmt(_float(m.get("train_loss"))),
                 _fmt(_float(m.get("eval_loss"))), _fmt(_float(m.get("eval_accuracy")), ".4f")]
                + ([_fmt(_float(m["epsilon"]) if m.get("epsilon") is not None else math.inf)
                    if "epsilon" in m else "-"] if has_eps else [])
                + [_fmt(_float(m.get("round_seconds")), ".3f")]
                for m in (metrics[i] for i in idx)]
        lines += [_markdown_table(header, body), ""]
    text = "\n".join(lines)
    _write_text_atomic(root / "run_summary.md", text)
    return text


def write_report(path: os.PathLike | str) -> tuple[str, list[Path]]:
    """The report of a run or sweep directory: its markdown and the files written."""
    root = check_report_dir(path)
    if is_run_dir(root):
        text = write_run_report(root)
        names = ["run_summary.md"] + (["metrics.png"] if (root / "metrics.jsonl").is_file() else [])
    else:
        text = write_sweep_report(root)
        names = ["sweep_summary.md", "sweep_summary.csv", "sweep_points.csv",
                 "privacy_utility.png"]
    return text, [root / n for n in names]


# ---------------------------------------------------------------------------- Hydra callback

class SweepSummaryCallback(Callback):
    """Writes the sweep report into the sweep directory during and after ``-m`` sweeps.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks``. After each grid
    point (``on_job_end``, also for a failed point) the report is refreshed
    quietly, so a sweep that stops half-way still leaves one (the points it never
    reached listed as not started); at the end of the sweep (``on_multirun_end``)
    it is written again and its summary table printed. Single runs are left
    alone. A report that cannot be written is a warning, never a failed sweep.
    """

    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.get("mode") == RunMode.MULTIRUN:
            self._write(Path(str(config.hydra.sweep.dir)), announce=False)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self._write(Path(str(config.hydra.sweep.dir)), announce=True)

    @staticmethod
    def _write(sweep_dir: Path, announce: bool) -> None:
        try:
            text = write_sweep_report(sweep_dir)
        except Exception as err:  # noqa: BLE001 - the sweep itself is not at fault
            first = (str(err).splitlines() or [type(err).__name__])[0]
            print(f"fedsim: warning: no sweep summary for {sweep_dir}: {first}", file=sys.stderr)
            return
        if announce:
            table = text.split("\n## Grid points")[0].rstrip()
            print(f"{table}\n\nfedsim: sweep summary in {sweep_dir}/sweep_summary.md (also "
                  "sweep_summary.csv, sweep_points.csv, privacy_utility.png)", flush=True)

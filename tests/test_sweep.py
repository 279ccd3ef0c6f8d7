"""Multirun grids summarised (fedsim.results.sweep, its Hydra callback, scripts/report.py) and
grid points run in parallel as Ray tasks (hydra/launcher=ray).

The grids run through the real command line in subprocesses: real Hydra, Ray and TF.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim.results.sweep import (
    COMPLETED,
    FAILED,
    INCOMPLETE,
    NOT_STARTED,
    collect_runs,
    plot_privacy_utility,
    summarize,
    write_sweep_report,
)

ROOT = Path(__file__).resolve().parent.parent
SIMULATE = ROOT / "scripts" / "simulate.py"
REPORT = ROOT / "scripts" / "report.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["clients=20", "clients_per_round=5", "rounds=2", "local_epochs=1", "model=logreg",
         "ray.workers=1", "ray.num_cpus=2", "progress=false"]
SWEEP_FILES = ("sweep_summary.csv", "sweep_summary.md", "sweep_points.csv", "privacy_utility.png")


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run one of the scripts as users do. PYTHONPATH holds the repository root so that
    the top-level ``hydra_plugins`` namespace (the Ray launcher) is importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=path)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- a real 2x2 grid

@pytest.fixture(scope="module")
def dp_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """dp.noise_multiplier=0.5,1.0 x seed=0,1 through `simulate.py -m`, 2 rounds each,
    two points at a time on Ray (hydra/launcher=ray)."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir = tmp / "grid"
    proc = run_script(SIMULATE, "-m", "hydra/launcher=ray", "hydra.launcher.max_parallel=2",
                      *SMALL, "dp=gaussian", "dp.noise_multiplier=0.5,1.0",
                      "seed=0,1", f"hydra.sweep.dir={sweep_dir}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir, proc


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_sweep_end_writes_summary_csv_with_mean_and_std_over_seeds(dp_sweep):
    sweep_dir, _ = dp_sweep
    points = read_csv(sweep_dir / "sweep_points.csv")
    assert [(p["noise_multiplier"], p["seed"], p["status"]) for p in points] == [
        ("0.5", "0", COMPLETED), ("0.5", "1", COMPLETED),
        ("1.0", "0", COMPLETED), ("1.0", "1", COMPLETED)]
    summaries = {p["point"]: json.loads((sweep_dir / p["point"] / "summary.json").read_text())
                 for p in points}
    groups = read_csv(sweep_dir / "sweep_summary.csv")
    assert [(g["mechanism"], g["noise_multiplier"], g["n"], g["completed"], g["seeds"])
            for g in groups] == [("gaussian", "0.5", "2", "2", "0 1"),
                                 ("gaussian", "1.0", "2", "2", "0 1")]
    for g, jobs in zip(groups, (("0", "1"), ("2", "3"))):
        acc = [summaries[j]["final"]["eval_accuracy"] for j in jobs]
        eps = [summaries[j]["privacy"]["epsilon"] for j in jobs]
        assert float(g["accuracy_mean"]) == pytest.approx(statistics.fmean(acc))
        assert float(g["accuracy_std"]) == pytest.approx(statistics.stdev(acc))
        assert float(g["epsilon_mean"]) == pytest.approx(eps[0]) and eps[0] == eps[1]
        assert g["status"] == "2/2 completed"
    # More noise, less privacy spent.
    assert float(groups[1]["epsilon_mean"]) < float(groups[0]["epsilon_mean"])


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_sweep_end_writes_markdown_table_and_plot(dp_sweep):
    sweep_dir, proc = dp_sweep
    text = (sweep_dir / "sweep_summary.md").read_text()
    # Sections: the grouped table first, then the privacy of the search, then every point.
    head, rest = text.split("\n## Privacy of the search\n")
    search, grid = rest.split("\n## Grid points\n")
    table = [line for line in head.splitlines() if line.startswith("|")]
    assert table[0].startswith("| mechanism | z | n | seeds | test accuracy | epsilon |")
    assert len(table) == 2 + 2  # header, separator, one row per noise multiplier
    assert all("gaussian" in row and " ± " in row and "2/2 completed" in row
               for row in table[2:])
    assert "4 grid points (4 completed), 2 groups" in text
    # A fixed grid that reports every point: the composition of the 4 trials applies.
    assert "a fixed grid of 4 points" in search and "composition of all 4 trials" in search
    points = [line for line in grid.splitlines() if line.startswith("| ")]
    assert len(points) == 2 + 4  # header, separator, 4 points
    # The callback printed the summary table at the end of the sweep.
    assert table[0] in proc.stdout and "fedsim: sweep summary in" in proc.stdout
    assert (sweep_dir / "privacy_utility.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_report_script_regenerates_sweep_and_run_reports(dp_sweep, tmp_path):
    sweep_dir, _ = dp_sweep
    before = (sweep_dir / "sweep_summary.csv").read_text()
    for name in SWEEP_FILES:
        (sweep_dir / name).unlink()
    proc = run_script(REPORT, str(sweep_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all((sweep_dir / name).is_file() for name in SWEEP_FILES)
    assert (sweep_dir / "sweep_summary.csv").read_text() == before
    assert (sweep_dir / "sweep_summary.md").read_text() in proc.stdout
    assert (sweep_dir / "privacy_utility.png").read_bytes()[:8] == PNG_MAGIC
    # One run directory: metrics.png redrawn from metrics.jsonl, a table per round.
    run_dir = sweep_dir / "0"
    (run_dir / "metrics.png").unlink()
    proc = run_script(REPORT, str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "metrics.png").read_bytes()[:8] == PNG_MAGIC
    assert "| round | train loss | test loss | test accuracy | epsilon |" in proc.stdout
    assert (run_dir / "run_summary.md").read_text() in proc.stdout


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_report_script_refuses_missing_or_foreign_directories(tmp_path):
    (tmp_path / "empty").mkdir()
    for target, words in ((tmp_path / "nope", "no such directory"),
                          (tmp_path / "empty", "not a fedsim run or sweep directory")):
        proc = run_script(REPORT, str(target), cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(lines) == 1 and lines[0].startswith(f"fedsim: error: {target}: {words}")


# ---------------------------------------------------------------------- the Ray launcher

@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_ray_launcher_runs_grid_points_in_parallel(dp_sweep):
    sweep_dir, proc = dp_sweep
    assert "Launching 4 jobs on Ray (2 CPUs" in proc.stdout + proc.stderr
    spans = []
    for job in ("0", "1", "2", "3"):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert summary["status"] == COMPLETED and summary["rounds_completed"] == 2
        spans.append(((sweep_dir / job / ".hydra" / "config.yaml").stat().st_mtime,
                      (sweep_dir / job / "summary.json").stat().st_mtime))
    # Each point's pool (1 worker, 1 CPU) fits beside another's: some ran at once.
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:])


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
@pytest.mark.parametrize("override,words", [
    ("hydra.launcher.max_parallel=0", "hydra.launcher.max_parallel=0: allowed is an integer >= 1"),
    ("clients_per_round=500",
     "grid point #0 (seed=0 clients_per_round=500): clients_per_round=500: allowed"),
])
def test_ray_launcher_refuses_bad_grids_before_running_anything(tmp_path, override, words):
    proc = run_script(SIMULATE, "-m", "hydra/launcher=ray", "seed=0,1", override,
                      f"hydra.sweep.dir={tmp_path / 'grid'}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: ") and words in lines[0]
    assert not list((tmp_path / "grid").glob("*/summary.json"))


# ---------------------------------------------------------------------- hand-made rows and dirs

def row(point, status, seed, z=0.5, acc=None, eps=None, mech="gaussian", wall=10.0):
    overrides = {"dp": mech, "seed": str(seed)}
    if z is not None:
        overrides["dp.noise_multiplier"] = str(z)
    return {"point": point, "dir": None, "status": status, "overrides": overrides,
            "override_list": [f"{k}={v}" for k, v in overrides.items()], "mechanism": mech,
            "noise_multiplier": z, "seed": seed, "rounds_completed": None, "accuracy": acc,
            "epsilon": eps, "wall_seconds": wall if status == COMPLETED else None, "note": ""}


def test_summarize_means_over_seeds_and_keeps_failed_points():
    rows = [row("0", COMPLETED, 0, acc=0.5, eps=8.0), row("1", COMPLETED, 1, acc=0.7, eps=8.0),
            row("2", FAILED, 2),
            row("3", COMPLETED, 0, z=0.0, acc=0.9, eps=math.inf),
            row("4", INCOMPLETE, 1, z=0.0, acc=0.1, eps=math.inf),
            row("5", COMPLETED, 0, z=None, acc=0.95, mech="none"),
            row("6", COMPLETED, 1, z=None, acc=0.93, mech="none")]
    groups = summarize(rows)
    assert [(g["mechanism"], g["noise_multiplier"]) for g in groups] == [
        ("gaussian", 0.5), ("gaussian", 0.0), ("none", None)]
    dp, no_noise, no_dp = groups
    assert (dp["n"], dp["completed"], dp["seeds"]) == (3, 2, [0, 1, 2])
    assert dp["accuracy_mean"] == pytest.approx(0.6)
    assert dp["accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert (dp["epsilon_mean"], dp["epsilon_std"]) == (8.0, 0.0)
    assert dp["status"] == "2/3 completed, 1 failed"
    # One completed point: no std; the incomplete one is counted, not averaged.
    assert no_noise["accuracy_mean"] == 0.9 and no_noise["accuracy_std"] is None
    assert math.isinf(no_noise["epsilon_mean"]) and no_noise["epsilon_std"] is None
    assert no_noise["status"] == "1/2 completed, 1 incomplete"
    assert no_dp["epsilon_mean"] is None and no_dp["accuracy_mean"] == pytest.approx(0.94)
    # Grouping over nothing: every point its own group; a group with no completed point.
    singles = summarize(rows, group_by_except=())
    assert len(singles) == len(rows)
    assert singles[2]["accuracy_mean"] is None and singles[2]["status"] == "0/1 completed, 1 failed"


def test_privacy_utility_plot_places_inf_and_no_dp_points(tmp_path):
    rows = [row("0", COMPLETED, 0, acc=0.5, eps=8.0), row("1", COMPLETED, 0, z=1.0, acc=0.3,
                                                          eps=2.0),
            row("2", COMPLETED, 0, z=0.0, acc=0.9, eps=math.inf),
            row("3", COMPLETED, 0, z=None, acc=0.95, mech="none")]
    path = tmp_path / "pu.png"
    plot_privacy_utility(summarize(rows), path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def write_point(job: Path, overrides: list[str], summary=None, metrics=(), z=0.5, seed=0):
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "dp": {"mechanism": "gaussian", "noise_multiplier": z}}))
    if metrics:
        (job / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))


def test_collect_runs_reports_failed_incomplete_and_never_started_points(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                    "max_batch_size": None, "params": None},
        "overrides": {"task": ["rounds=3", "dp=gaussian", "dp.noise_multiplier=0.5,1.0",
                               "seed=0,1"]}}}))
    grid = [["rounds=3", "dp=gaussian", f"dp.noise_multiplier={z}", f"seed={s}"]
            for z in ("0.5", "1.0") for s in (0, 1)]
    write_point(sweep / "0", grid[0], summary={
        "status": "completed", "stop_reason": "reached rounds=3", "rounds_completed": 3,
        "final": {"eval_accuracy": 0.8}, "wall_seconds": 12.5,
        "privacy": {"mechanism": "gaussian", "epsilon": 30.0},
        "config": {"seed": 0, "dp": {"mechanism": "gaussian", "noise_multiplier": 0.5}}})
    write_point(sweep / "1", grid[1], seed=1)  # failed before its first round
    write_point(sweep / "2", grid[2], z=1.0, metrics=[
        {"round": 1, "eval_accuracy": 0.4, "epsilon": 3.0},
        {"round": 2, "eval_accuracy": None, "epsilon": 4.5}])  # killed after round 2
    rows = collect_runs(sweep)
    assert [(r["point"], r["status"], r["noise_multiplier"], r["seed"]) for r in rows] == [
        ("0", COMPLETED, 0.5, 0), ("1", FAILED, 0.5, 1), ("2", INCOMPLETE, 1.0, 0),
        ("#3", NOT_STARTED, 1.0, 1)]
    assert rows[0]["accuracy"] == 0.8 and rows[0]["epsilon"] == 30.0
    assert (rows[2]["rounds_completed"], rows[2]["accuracy"], rows[2]["epsilon"]) == (2, 0.4, 4.5)
    text = write_sweep_report(sweep)
    assert "4 grid points (1 completed), 2 groups" in text
    assert "1/2 completed, 1 failed" in text
    assert "0/2 completed, 1 incomplete, 1 not started" in text
    assert read_csv(sweep / "sweep_summary.csv")[1]["accuracy_mean"] == ""
    # A single run directory is one row.
    assert [r["status"] for r in collect_runs(sweep / "2")] == [INCOMPLETE]
    # Resuming is suggested only where a checkpoint it can resume from is.
    assert "resume=" not in collect_runs(sweep / "2")[0]["note"]
    (sweep / "2" / "checkpoint.pkl").write_bytes(b"format 1: no longer resumable")
    assert "resume=" not in collect_runs(sweep / "2")[0]["note"]
    (sweep / "2" / "checkpoint.json").write_text("{}")
    assert f"continue with resume={sweep / '2'}" in collect_runs(sweep / "2")[0]["note"]


def private_summary(accuracy: float, z: float, rounds: int = 5) -> dict:
    """A completed DP run's summary.json as fedsim writes it: the event of ``rounds``
    Poisson-sampled Gaussian rounds from a real accountant."""
    from dp_accounting import GaussianDpEvent

    from fedsim.privacy.accounting import PrivacyAccountant
    from fedsim.results.summary import encoded_run_event

    acct = PrivacyAccountant("rdp", "poisson", 20, 5, 1e-3)
    for _ in range(rounds):
        acct.record(acct.round_event(GaussianDpEvent(z)))
    return json.loads(json.dumps({
        "status": "completed", "stop_reason": "reached rounds=5", "rounds_completed": rounds,
        "final": {"eval_accuracy": accuracy}, "wall_seconds": 3.0,
        "privacy": {"mechanism": "gaussian", "epsilon": acct.epsilon(), "delta": acct.delta,
                    "neighboring_relation": acct.relation.name,
                    "event": encoded_run_event(acct)},
        "config": {"seed": 0, "dp": {"mechanism": "gaussian", "noise_multiplier": z}}}))


def test_sweep_summary_states_the_privacy_cost_of_the_whole_search(tmp_path):
    """Three trials of the same noise on one population: the report gives the
    composition of all three (what applies to a search that reports every trial)
    and the repeat-and-select figure, as fedsim.privacy.tuning computes them, and
    says why the composition applies (a fixed number of trials, or an adaptive
    sampler)."""
    from fedsim.privacy.tuning import search_privacy

    sweep = tmp_path / "sweep"
    summaries = [private_summary(a, 1.0) for a in (0.5, 0.7, 0.6)]
    for n, (lr, summary) in enumerate(zip(("0.1", "0.2", "0.3"), summaries)):
        write_point(sweep / str(n), [f"client.learning_rate={lr}"], summary=summary, z=1.0)
    def sampler(name: str) -> None:
        for n in range(3):
            (sweep / str(n) / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {
                "sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper."
                                        "OptunaSweeper", "sampler": {"_target_": name}}}}))

    sampler("optuna.samplers.RandomSampler")
    copy = sweep / "mlruns" / "1" / "abc" / "artifacts"  # tracking=mlflow's store: not a point
    copy.mkdir(parents=True)
    (copy / "summary.json").write_text(json.dumps(summaries[0]))
    text = write_sweep_report(sweep)
    assert [r["point"] for r in collect_runs(sweep)] == ["0", "1", "2"]
    want = search_privacy(summaries)
    one = summaries[0]["privacy"]["epsilon"]
    assert one < want.composed_epsilon < 3 * one
    assert 0 < want.repeat_and_select_epsilon < want.composed_epsilon
    section = text.split("## Privacy of the search")[1].split("## Grid points")[0]
    assert f"| composition of all 3 trials (ComposedDpEvent) | {want.composed_epsilon:.4g} |" \
        in section
    assert f"geometric number of trials, mean 3) | {want.repeat_and_select_epsilon:.4g} |" \
        in section
    assert ("This sweep was a fixed number of trials (hydra.sweeper.n_trials) of "
            "RandomSampler and reports every trial, so the composition applies: "
            f"**epsilon = {want.composed_epsilon:.4g} at delta = 0.001**") in section
    sampler("optuna.samplers.TPESampler")
    assert "This sweep was an adaptive search (TPESampler: each trial's hyperparameters " \
        "depend on earlier results)" in write_sweep_report(sweep)
    # a trial that trained without DP makes the search non-private
    write_point(sweep / "3", ["dp=none"], summary={
        "status": "completed", "final": {"eval_accuracy": 0.9},
        "privacy": {"mechanism": "none", "epsilon": None},
        "config": {"seed": 0, "dp": {"mechanism": "none"}}})
    assert "the search as a whole is not private" in write_sweep_report(sweep)

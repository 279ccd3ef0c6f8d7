"""MLflow tracking (fedsim.results.tracking, ``tracking=mlflow``), read back from a
real local MLflow file store with MLflow's own client."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import small_config

from fedsim.cli import objective, with_hydra_tracking
from fedsim.config import DPConfig, ServerConfig, TrackingConfig
from fedsim.errors import ConfigError, FedsimError
from fedsim.results.callbacks import RunContext
from fedsim.results.tracking import MlflowTracking, file_store_uri, flatten, metric_values


def client_of(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=file_store_uri(store))


def only_run(store: Path, experiment: str = "fedsim"):
    client = client_of(store)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_tracked_run_holds_config_metrics_summary_plot_and_weights(warm_actors, tmp_path):
    from fedsim.simulation import run_simulation

    cfg = small_config(dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0),
                       server=ServerConfig(weighting="uniform"),
                       tracking=TrackingConfig(kind="mlflow", tags={"purpose": "test"}))
    out = tmp_path / "run"
    result = run_simulation(cfg, out, actors=warm_actors)
    client, run = only_run(out / "mlruns")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["clients"], params["dp.noise_multiplier"], params["model.name"],
            params["model.hidden"], params["tracking.kind"]) == ("20", "1.0", "logreg",
                                                                 "[200, 200]", "mlflow")
    assert len(params) == len(flatten(json.loads((out / "summary.json").read_text())["config"]))
    for key in ("eval_accuracy", "train_loss", "epsilon"):
        assert history(client, run.info.run_id, key) == [
            (r["round"], pytest.approx(r[key])) for r in result.metrics]
    assert run.data.tags["purpose"] == "test"
    assert run.data.tags["fedsim.status"] == "completed"
    assert run.data.tags["fedsim.output_dir"] == str(out.absolute())
    names = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert names == {"summary.json", "metrics.png", "final_weights.npy"}
    got = Path(client.download_artifacts(run.info.run_id, "final_weights.npy", str(tmp_path)))
    assert np.array_equal(np.load(got), result.weights)
    summary = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path)))
    assert json.loads(summary.read_text()) == json.loads((out / "summary.json").read_text())
    assert objective(result.summary) == result.metrics[-1]["eval_accuracy"]


def context(cfg, out, rows=(), first_round=1) -> RunContext:
    return RunContext(cfg, out, list(rows), first_round, None, None, lambda r: None, dict)


def test_a_run_that_fails_ends_its_mlflow_run_failed_with_the_rounds_it_ran(tmp_path):
    cfg = small_config(tracking=TrackingConfig(kind="mlflow", experiment="exp one"))
    kept = [{"round": 1, "train_loss": 2.0, "eval_accuracy": 0.3, "note": "text"},
            {"round": 2, "train_loss": 1.5, "eval_accuracy": None}]
    hook = MlflowTracking(cfg.tracking)
    ctx = context(cfg, tmp_path, kept, first_round=3)  # a resumed run: rounds 1, 2 kept
    hook.on_run_start(ctx)
    hook.on_round_end(ctx, {"round": 3, "train_loss": 1.0, "eval_accuracy": 0.6,
                            "epsilon": float("inf"), "mem server (MiB)": 10})
    hook.close()
    client, run = only_run(tmp_path / "mlruns", "exp one")
    assert run.info.status == "FAILED" and run.data.tags["fedsim.status"] == "failed"
    assert run.data.tags["fedsim.resumed_from_round"] == "2"
    assert history(client, run.info.run_id, "train_loss") == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert history(client, run.info.run_id, "eval_accuracy") == [(1, 0.3), (3, 0.6)]
    assert set(run.data.metrics) == {"train_loss", "eval_accuracy", "mem server _MiB_"}
    assert client.list_artifacts(run.info.run_id) == []


def test_parallel_points_share_one_experiment_in_one_file_store(tmp_path):
    """Points of a multirun start at once against one store: one experiment, all runs."""
    cfg = small_config(tracking=TrackingConfig(kind="mlflow", uri=file_store_uri(tmp_path)))
    hooks = [MlflowTracking(cfg.tracking) for _ in range(6)]
    threads = [threading.Thread(target=h.on_run_start, args=(context(cfg, None),))
               for h in hooks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = client_of(tmp_path)
    exps = [e for e in client.search_experiments() if e.name == "fedsim"]
    assert len(exps) == 1
    assert len(client.search_runs([exps[0].experiment_id])) == 6
    assert all(h.run_id for h in hooks)


def test_tracking_needs_a_store_and_a_known_kind(tmp_path):
    cfg = small_config(tracking=TrackingConfig(kind="mlflow"))
    with pytest.raises(FedsimError, match="tracking.uri=None: allowed is a tracking URI"):
        MlflowTracking(cfg.tracking).on_run_start(context(cfg, None))
    with pytest.raises(ConfigError, match="tracking.kind=wandb: allowed is one of none, mlflow"):
        TrackingConfig(kind="wandb")
    with pytest.raises(ConfigError, match="tracking.experiment= : allowed is a non-empty"):
        TrackingConfig(kind="mlflow", experiment=" ")


def test_a_multirun_point_tracks_into_the_sweeps_store_with_its_overrides(tmp_path):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.create({"sweep": {"dir": str(tmp_path / "sweep")}, "job": {"num": 3},
                                  "overrides": {"task": ["seed=1", "+dp=gaussian"]}})
    hydra_cfg.mode = RunMode.MULTIRUN
    sim = with_hydra_tracking(small_config(tracking=TrackingConfig(
        kind="mlflow", tags={"who": "me"})), hydra_cfg)
    assert sim.tracking.uri == file_store_uri(tmp_path / "sweep" / "mlruns")
    assert sim.tracking.tags == {"override.seed": "1", "override.dp": "gaussian", "who": "me",
                                 "hydra.sweep_dir": str(tmp_path / "sweep"),
                                 "hydra.job_num": "3", "hydra.overrides": "seed=1 +dp=gaussian"}
    hydra_cfg.mode = RunMode.RUN  # a single run keeps its store in its directory
    assert with_hydra_tracking(small_config(tracking=TrackingConfig(kind="mlflow")),
                               hydra_cfg).tracking.uri is None
    untracked = small_config()
    assert with_hydra_tracking(untracked, hydra_cfg) is untracked


def test_metric_values_keep_finite_numbers_with_mlflow_keys():
    assert metric_values({"round": 4, "a": 1, "b": None, "c": float("nan"), "d": True,
                          "e": np.float32(0.5), "f/g h": 2.0, "x:y": 3}) == {
        "a": 1.0, "e": 0.5, "f/g h": 2.0, "x_y": 3.0}


# ---------------------------------------------------------------- end to end, fresh processes

def run_cli(*args: str, cwd: Path):
    """scripts/simulate.py as users run it (the repository root on PYTHONPATH for the
    Ray launcher plugin)."""
    import os
    import subprocess
    import sys

    from helpers import ROOT, SCRIPT

    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


SMALL = ["clients=20", "clients_per_round=5", "rounds=2", "local_epochs=1", "model=logreg",
         "ray.workers=1", "ray.num_cpus=2", "progress=false"]


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_a_multirun_is_one_experiment_whose_runs_hold_every_points_metrics(tmp_path):
    from fedsim.results.outputs import read_metrics

    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "hydra/launcher=ray", "hydra.launcher.max_parallel=2", *SMALL,
                   "tracking=mlflow", "dp=gaussian", "seed=0,1", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = client_of(sweep / "mlruns")
    exp = client.get_experiment_by_name("fedsim")
    runs = {r.data.tags["override.seed"]: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["0", "1"]
    for num, seed in ((0, "0"), (1, "1")):
        run, rows = runs[seed], read_metrics(sweep / str(num) / "metrics.jsonl")
        assert run.info.status == "FINISHED" and run.data.params["seed"] == seed
        assert run.data.tags["hydra.sweep_dir"] == str(sweep)
        for key in ("eval_accuracy", "epsilon"):
            assert history(client, run.info.run_id, key) == [
                (r["round"], pytest.approx(r[key])) for r in rows]
    assert not (sweep / "0" / "mlruns").exists()  # one store, the sweep's


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_a_single_run_tracks_to_an_mlflow_server(tmp_path):
    """A real `mlflow server` on localhost, tracking.uri pointing at it."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", file_store_uri(tmp_path / "server-store"),
         "--default-artifact-root", file_store_uri(tmp_path / "server-artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        out = tmp_path / "run"
        proc = run_cli(*SMALL, "tracking=mlflow", f"tracking.uri={uri}",
                       "tracking.experiment=served", f"hydra.run.dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        from fedsim.results.outputs import read_metrics

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert history(client, runs[0].info.run_id, "eval_accuracy") == [
            (r["round"], pytest.approx(r["eval_accuracy"]))
            for r in read_metrics(out / "metrics.jsonl")]
        assert {f.path for f in client.list_artifacts(runs[0].info.run_id)} == {
            "summary.json", "metrics.png", "final_weights.npy"}
        assert not (out / "mlruns").exists()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

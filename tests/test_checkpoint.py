"""Checkpoints: a run killed with SIGKILL and resumed equals the uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import DPConfig, ModelConfig, RayConfig, ServerConfig, SimConfig
from fedsim.privacy.accounting import LedgerError
from fedsim.results.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
from fedsim.results.outputs import read_metrics
from fedsim.simulation import run_simulation

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = {"round_seconds", "eval_seconds", "secagg_seconds"}
# Heavy enough local work (6 epochs at batch 1) that a round takes a noticeable time
# (rounds 4-6 leave the test about a second to kill the run after checkpoint 3).
ARGS = dict(clients=30, clients_per_round=10, rounds=6, local_epochs=6, batch_size=1,
            checkpoint_every=3)


def _cfg(**kw) -> SimConfig:
    base = dict(ARGS, model=ModelConfig(name="logreg"), progress=False,
                ray=RayConfig(num_cpus=2, workers=1), server=ServerConfig(weighting="uniform"),
                dp=DPConfig(mechanism="gaussian_adaptive", noise_multiplier=0.3))
    base.update(kw)
    return SimConfig(**base)


def _cli(*extra: str) -> list[str]:
    args = [f"{k}={v}" for k, v in ARGS.items()]
    return [sys.executable, str(ROOT / "scripts" / "simulate.py"), *args, "model=logreg",
            "dp=gaussian_adaptive", "dp.noise_multiplier=0.3", "ray.num_cpus=2", "ray.workers=1",
            "progress=false", *extra]


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_sigkill_after_round_3_then_resume_equals_uninterrupted(warm_actors, tmp_path):
    reference = run_simulation(_cfg(), tmp_path / "reference", actors=warm_actors)

    run_dir = tmp_path / "killed"
    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    proc = subprocess.Popen(_cli(f"hydra.run.dir={run_dir}"), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ckpt = run_dir / CHECKPOINT
            if ckpt.exists() and load_checkpoint(run_dir)["round"] >= 3:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, at once
        proc.wait(timeout=60)
    assert load_checkpoint(run_dir)["round"] == 3
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run(_cli(f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'r2'}"),
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _strip(read_metrics(run_dir / "metrics.jsonl")) == _strip(reference.metrics)
    final = load_checkpoint(run_dir)
    assert final["round"] == 6
    np.testing.assert_array_equal(final["server"]["weights"], reference.weights)
    assert "epsilon" in reference.metrics[-1]  # the ledger continued, never reset


def test_corrupted_checkpoint_is_refused_and_left_untouched(warm_actors, tmp_path):
    run_simulation(dataclasses.replace(_cfg(), rounds=2, local_epochs=1), tmp_path / "run",
                   actors=warm_actors)
    path = tmp_path / "run" / CHECKPOINT
    good = path.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted or partial"):
        run_simulation(dataclasses.replace(_cfg(), rounds=3, local_epochs=1,
                                           resume=str(tmp_path / "run")), actors=warm_actors)
    assert path.read_bytes() == bytes(data)
    path.write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(CheckpointError, match="corrupted or partial"):
        run_simulation(dataclasses.replace(_cfg(), rounds=3, local_epochs=1,
                                           resume=str(tmp_path / "run")), actors=warm_actors)
    # The arrays' file (weights, optimizer and aggregator state) is checksummed too.
    path.write_bytes(good)
    (npz,) = path.parent.glob("checkpoint-*.npz")
    arrays = bytearray(npz.read_bytes())
    arrays[len(arrays) // 2] ^= 0xFF
    npz.write_bytes(bytes(arrays))
    with pytest.raises(CheckpointError, match=f"{npz.name} is corrupted or partial"):
        run_simulation(dataclasses.replace(_cfg(), rounds=3, local_epochs=1,
                                           resume=str(tmp_path / "run")), actors=warm_actors)
    assert npz.read_bytes() == bytes(arrays)


def test_changed_privacy_parameters_need_force_and_the_ledger_keeps_both(warm_actors, tmp_path):
    small = dataclasses.replace(_cfg(), rounds=2, local_epochs=1)
    run_simulation(small, tmp_path / "run", actors=warm_actors)
    louder = dataclasses.replace(small, rounds=3, resume=str(tmp_path / "run"),
                                 dp=dataclasses.replace(small.dp, noise_multiplier=0.35))
    with pytest.raises(CheckpointError, match="privacy parameter dp differs"):
        run_simulation(louder, actors=warm_actors)
    with pytest.raises(CheckpointError, match="model differs"):
        run_simulation(dataclasses.replace(louder, model=ModelConfig(name="mlp"),
                                           resume_force=True), actors=warm_actors)
    res = run_simulation(dataclasses.replace(louder, resume_force=True), actors=warm_actors)
    ledger = res.summary["privacy"]["ledger"]
    assert [e["count"] for e in ledger] == [2, 1]  # both noise levels, never reset
    assert res.metrics[-1]["epsilon"] > res.metrics[1]["epsilon"]
    assert res.summary["resumed_from_round"] == 2
    # Another neighbouring relation cannot continue the ledger: one line, nothing run
    # (this was dp-accounting's UnsupportedEventError from deep inside the accountant).
    with pytest.raises(LedgerError, match="sampling=poisson changes the neighbouring relation"):
        run_simulation(dataclasses.replace(louder, rounds=4, resume_force=True,
                                           sampling="poisson"), actors=warm_actors)
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 3

"""Shared pieces of the simulation tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedsim.config import ModelConfig, RayConfig, SimConfig

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "simulate.py"

# Per-round keys that measure time, not results.
TIMINGS = {"round_seconds", "eval_seconds", "secagg_seconds"}


def small_config(**kw) -> SimConfig:
    """A quick simulation: 20 clients, 5 per round, 3 rounds of logreg on 1 worker
    (each worker actor costs a TensorFlow start-up; tests of several workers ask)."""
    base = dict(clients=20, clients_per_round=5, rounds=3, local_epochs=1, batch_size=10,
                model=ModelConfig(name="logreg"), ray=RayConfig(workers=1), progress=False)
    base.update(kw)
    return SimConfig(**base)


def without_timings(rows, also=()):
    """Metrics rows without the timing keys (and ``also``): what a rerun must reproduce."""
    drop = TIMINGS | set(also)
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def simulate(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``scripts/simulate.py`` with ``args`` as a user would (a fresh process)."""
    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)

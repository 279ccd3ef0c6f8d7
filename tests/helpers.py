"""Shared pieces of the simulation tests."""

from __future__ import annotations

from fedsim.config import ModelConfig, RayConfig, SimConfig

# Per-round keys that measure time, not results.
TIMINGS = {"round_seconds", "eval_seconds", "secagg_seconds"}


def small_config(**kw) -> SimConfig:
    """A quick simulation: 20 clients, 5 per round, 3 rounds of logreg on 2 workers."""
    base = dict(clients=20, clients_per_round=5, rounds=3, local_epochs=1, batch_size=10,
                model=ModelConfig(name="logreg"), ray=RayConfig(workers=2), progress=False)
    base.update(kw)
    return SimConfig(**base)


def without_timings(rows, also=()):
    """Metrics rows without the timing keys (and ``also``): what a rerun must reproduce."""
    drop = TIMINGS | set(also)
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]

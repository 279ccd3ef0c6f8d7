"""Golden fingerprints: what a few representative runs compute, bit for bit.

Each case composes its config from ``conf/`` exactly as the command line does
(``scripts/simulate.py`` with the same overrides), runs it, and compares every
metric except timings, and the sha256 of the final global weights, with the
values committed in ``tests/golden/fingerprints.json``. A refactoring must
reproduce them exactly; a change that must alter one says why in its commit and
rewrites the file with ``uv run python tests/test_golden.py --write``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # (run as a script: helpers next to it)
from helpers import ROOT, without_timings  # noqa: E402

GOLDEN = HERE / "golden" / "fingerprints.json"
SMALL = ["clients=30", "clients_per_round=10", "rounds=3", "local_epochs=1", "model=logreg",
         "ray.workers=1", "progress=false", "checkpoint_every=0"]
CASES = {
    "fedavg": [],
    "gaussian_adaptive": ["dp=gaussian_adaptive"],
    "secagg_plus_distributed_skellam": ["secagg=secagg_plus", "dp=distributed_skellam"],
    "vectorize": ["client.vectorize=4"],
    # The trainer client.vectorize=auto (the default) replaced: before it, "fedavg".
    "one_at_a_time": ["client.vectorize=0"],
}


def compose(overrides: list[str]):
    """The SimConfig that ``scripts/simulate.py <overrides>`` runs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedsim.cli import register_configs, to_sim_config

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_sim_config(hydra_compose("config", overrides=overrides))


def fingerprint(name: str, actors=None) -> dict:
    """Case ``name``'s fingerprint, run on ``actors`` (a WarmActors; None: fresh
    actors, as the committed fingerprints were made)."""
    from fedsim.simulation import run_simulation

    result = run_simulation(compose(SMALL + CASES[name]), actors=actors)
    return {"overrides": CASES[name],
            "metrics": without_timings(result.metrics, also=("retries",)),
            "weights_sha256": hashlib.sha256(result.weights.tobytes()).hexdigest()}


def _json(value) -> object:
    return json.loads(json.dumps(value))  # as stored: tuples become lists


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_fingerprint(warm_actors, name):
    # On the session's warm actors, which earlier runs (other cases and tests)
    # used: a reset actor must compute what a fresh one computed, bit for bit.
    want = json.loads(GOLDEN.read_text())[name]
    got = _json(fingerprint(name, warm_actors))
    assert got["metrics"] == want["metrics"]
    assert got["weights_sha256"] == want["weights_sha256"]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import os

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({n: fingerprint(n) for n in sorted(CASES)}, indent=1,
                                 sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")

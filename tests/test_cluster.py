"""The same command on a real multi-node Ray cluster (two raylets on this machine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ROOT, simulate, small_config, without_timings
from ray.cluster_utils import Cluster

from fedsim.config import RayConfig
from fedsim.results.checkpoint import load_checkpoint
from fedsim.simulation import run_simulation


@pytest.fixture
def two_nodes():
    """A head node and a second node, 1 CPU each; this process does not join it."""
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, wait=True)
    yield cluster
    cluster.shutdown()


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_simulate_runs_unchanged_on_a_two_node_cluster_with_the_single_node_result(
        two_nodes, ray_local, tmp_path):
    run_dir = tmp_path / "run"
    args = ["clients=20", "clients_per_round=5", "rounds=2", "local_epochs=1", "model=logreg",
            "progress=false", "checkpoint_every=0"]
    proc = simulate(*args, "ray=cluster", f"ray.address={two_nodes.address}",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # workers=auto: one per CPU, one on each node, running the code Ray shipped.
    assert summary["workers"] == 2 and summary["worker_nodes"] == 2
    for where in summary["worker_placement"]:
        assert not where["code"].startswith(str(ROOT)), where
    # The same seed on a single local node gives the same run, bit for bit.
    local = run_simulation(small_config(clients=20, clients_per_round=5, rounds=2,
                                        ray=RayConfig(workers=2)))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert without_timings(rows) == without_timings(local.metrics)
    assert np.array_equal(load_checkpoint(run_dir)["server"]["weights"], local.weights)

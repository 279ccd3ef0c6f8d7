"""Worker actors that die mid-round: the round is re-run on a restarted actor."""

from __future__ import annotations

import dataclasses

import pytest

from fedsim.checkpoint import load_checkpoint
from fedsim.config import FaultsConfig
from fedsim.errors import FedsimError
from fedsim.simulation import run_simulation
from helpers import small_config, without_timings



def _cfg(**kw):
    return small_config(clients_per_round=6, **kw)


def test_worker_crash_mid_round_is_retried_with_the_same_result(ray_local):
    reference = run_simulation(_cfg())
    crashed = run_simulation(_cfg(faults=FaultsConfig(crash_worker_at_round=2)))
    assert [r["retries"] for r in crashed.metrics] == [0, 1, 0]
    assert (without_timings(crashed.metrics, also={"retries"})
            == without_timings(reference.metrics, also={"retries"}))
    assert (crashed.weights == reference.weights).all()


def test_past_the_retry_bound_a_clear_error_and_a_checkpoint(ray_local, tmp_path):
    cfg = _cfg(faults=FaultsConfig(crash_worker_at_round=2, max_retries=0))
    with pytest.raises(FedsimError, match=r"round 2: worker actors died 1 times .*resume="):
        run_simulation(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run")["round"] == 1
    resumed = run_simulation(dataclasses.replace(cfg, resume=str(tmp_path / "run"),
                                                 faults=FaultsConfig()))
    assert [r["round"] for r in resumed.metrics] == [1, 2, 3]

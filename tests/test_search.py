"""An Optuna hyperparameter search (hydra/sweeper=optuna, conf/search/dp_tuning.yaml)
end to end: trials in parallel on the Ray launcher, each returning its final test
accuracy, and the sweep's report with the privacy cost of the whole search."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from test_tracking import SMALL, run_cli

from fedsim.privacy.tuning import search_privacy


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_an_optuna_search_runs_end_to_end_and_reports_its_privacy_cost(tmp_path):
    sweep = tmp_path / "search"
    proc = run_cli("-m", "+search=dp_tuning", "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.n_jobs=2", "hydra/launcher=ray",
                   "hydra.launcher.max_parallel=2", *SMALL, f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((sweep / str(n) / "summary.json").read_text()) for n in (0, 1)]
    accuracies = [s["final"]["eval_accuracy"] for s in summaries]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(accuracies))  # the objective simulate.py returns
    for s in summaries:  # the sampled hyperparameters, in the example's ranges
        c = s["config"]
        assert 0.01 <= c["client"]["learning_rate"] <= 0.5
        assert 0.3 <= c["server"]["learning_rate"] <= 3.0
        assert 0.1 <= c["dp"]["l2_norm_clip"] <= 4.0
        assert (c["dp"]["mechanism"], c["dp"]["noise_multiplier"]) == ("gaussian", 1.0)
    assert len({s["config"]["client"]["learning_rate"] for s in summaries}) == 2
    cost = search_privacy(summaries)
    single = max(s["privacy"]["epsilon"] for s in summaries)
    assert single < cost.composed_epsilon < 2 * single and math.isfinite(
        cost.repeat_and_select_epsilon)
    report = (sweep / "sweep_summary.md").read_text()
    assert f"**epsilon = {cost.composed_epsilon:.4g} at delta" in report
    assert "fixed number of trials (hydra.sweeper.n_trials) of RandomSampler" in report
    assert (sweep / "privacy_utility.png").stat().st_size > 10_000

"""Run a federated simulation: ``uv run python scripts/simulate.py clients=100``.

Thin entry point: Hydra composes ``conf/``; :mod:`fedsim.simulation` does the work.
Outputs go to Hydra's run directory (``outputs/<date>/<time>``, or
``multirun/<date>/<time>/<n>`` with ``-m``). ``main`` returns the run's objective
(the final test accuracy, or the task's primary metric) for sweepers such as
``hydra/sweeper=optuna``.
"""

import os
import sys
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedsim.cli import (  # noqa: E402
    objective,
    register_configs,
    run_cli,
    to_sim_config,
    user_errors,
    with_hydra_tracking,
)
from fedsim.results.outputs import summary_line  # noqa: E402
from fedsim.simulation import run_simulation  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    """One run; returns the objective a sweeper optimizes (:func:`fedsim.cli.objective`:
    the final value of the task's primary metric, e.g. test accuracy)."""
    hydra_cfg = HydraConfig.get()
    with user_errors():
        result = run_simulation(with_hydra_tracking(to_sim_config(cfg), hydra_cfg),
                                hydra_cfg.runtime.output_dir)
    print(summary_line(result.summary, result.output_dir))
    return objective(result.summary)


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""Run a federated simulation: ``uv run python scripts/simulate.py clients=100``.

Thin entry point: Hydra composes ``conf/``; :mod:`fedsim.simulation` does the work.
Outputs go to Hydra's run directory (``outputs/<date>/<time>``, or
``multirun/<date>/<time>/<n>`` with ``-m``).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fedsim.cli import register_configs, run_cli, to_sim_config, user_errors  # noqa: E402
from fedsim.results.outputs import summary_line  # noqa: E402
from fedsim.simulation import run_simulation  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out = HydraConfig.get().runtime.output_dir
    with user_errors():
        result = run_simulation(to_sim_config(cfg), out)
    print(summary_line(result.summary, result.output_dir))


if __name__ == "__main__":
    sys.exit(run_cli(main))

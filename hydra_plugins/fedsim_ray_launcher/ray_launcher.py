"""``hydra/launcher=ray``: a multirun's grid points as tasks on a Ray cluster.

::

    uv run python scripts/simulate.py -m hydra/launcher=ray ray.workers=1 seed=0,1,2,3

Each grid point runs Hydra's ``run_job`` (its own job directory, ``.hydra/``,
logging and callbacks, exactly as with the default launcher) inside a Ray task.
The launcher joins or starts Ray the way a fedsim run does
(:func:`fedsim.simulation.connect_ray`: the same runtime environment, and the
project shipped as working_dir to a cluster), and each run inside a task reuses
that connection.

Resources: the task itself takes no CPU; the worker actors its run starts
(``ray.workers`` of ``ray.cpus_per_worker`` CPUs and ``ray.gpus_per_worker``
GPUs each, or with ``ray.workers=auto`` as many as the whole cluster holds) are
reserved up front, all at once, as one Ray placement group per grid point that
captures the run's actors (:func:`fedsim.engine.worker.make_pool` sees it and uses its
bundles rather than reserving a second group). A point starts only when its
whole pool fits, so parallel points never deadlock holding parts of their
pools; the rest wait in line. On 2 CPUs, ``ray.workers=1`` runs two points at a
time, the default ``ray.workers=auto`` one at a time.

Options (``hydra.launcher.*``):

- ``address``: Ray to use; default ``${ray.address}`` (null: a local instance).
- ``num_cpus``: CPUs of a local instance; default ``${ray.num_cpus}``.
- ``connect_timeout_s``: how long ``address`` may take to answer; default
  ``${ray.connect_timeout_s}``.
- ``max_parallel``: at most this many grid points at once; null (default): as many
  as the cluster's resources hold.

Jobs never change directory (``hydra.job.chdir=false``); the sweep directory is
made absolute, so on a multi-node cluster it must be on a filesystem that every
node shares. A point that fails does not stop the others; once all have ended,
Hydra reports the first failure (a configuration error exits 2, as without this
launcher).
"""


import logging
from dataclasses import dataclass
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@dataclass
class FedsimRayLauncherConf:
    """The schema of ``hydra/launcher=ray``."""

    _target_: str = "hydra_plugins.fedsim_ray_launcher.ray_launcher.FedsimRayLauncher"
    address: Optional[str] = "${ray.address}"
    num_cpus: Optional[int] = "${ray.num_cpus}"  # type: ignore[assignment]  # interpolation
    connect_timeout_s: float = "${ray.connect_timeout_s}"  # type: ignore[assignment]
    max_parallel: Optional[int] = None


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=FedsimRayLauncherConf,
                             provider="fedsim_ray_launcher")


class FedsimRayLauncher(Launcher):
    """Runs each grid point's Hydra job as a Ray task, at most ``max_parallel`` at once."""

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None,
                 connect_timeout_s: float = 15.0, max_parallel: Optional[int] = None) -> None:
        from fedsim.config import RayConfig
        from fedsim.errors import ConfigError

        if max_parallel is not None and (isinstance(max_parallel, bool) or max_parallel < 1):
            raise ConfigError("hydra.launcher.max_parallel", "an integer >= 1, or null (as many "
                              "grid points at once as the Ray cluster holds)", max_parallel)
        self.ray_config = RayConfig(address=address, num_cpus=num_cpus,  # validates
                                    connect_timeout_s=connect_timeout_s)
        self.max_parallel = max_parallel
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.fedsim_ray_launcher import _core

        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        return _core.launch(self, job_overrides, initial_job_idx)

    def __repr__(self) -> str:  # pragma: no cover - for logs
        return (f"FedsimRayLauncher(address={self.ray_config.address!r}, "
                f"num_cpus={self.ray_config.num_cpus}, max_parallel={self.max_parallel})")


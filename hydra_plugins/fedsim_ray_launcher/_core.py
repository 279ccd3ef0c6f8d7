"""The launcher's work: check the grid, reserve each point's resources, run the jobs.

Not scanned by Hydra's plugin discovery (leading underscore), and imports Ray only
inside functions: fedsim's :func:`~fedsim.simulation.connect_ray` must see Ray
imported for the first time to set up its environment switches.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import DictConfig, open_dict, read_write

from fedsim.errors import FedsimError

if TYPE_CHECKING:  # pragma: no cover
    from fedsim.config import SimConfig
    from hydra_plugins.fedsim_ray_launcher.ray_launcher import FedsimRayLauncher

log = logging.getLogger(__name__)


def job_config(launcher: "FedsimRayLauncher", overrides: Sequence[str], num: int,
               sweep_dir: Path) -> DictConfig:
    """The composed config of grid point ``num``, writing into ``sweep_dir/<subdir>``."""
    assert launcher.hydra_context is not None and launcher.config is not None
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
        cfg.hydra.sweep.dir = str(sweep_dir)
    return cfg


def sim_config(cfg: DictConfig, num: int, overrides: Sequence[str]) -> "SimConfig":
    """Validate a grid point's config before anything runs; one line if it is wrong."""
    from fedsim.cli import format_error, to_sim_config

    task_cfg = copy.deepcopy(cfg)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    try:
        return to_sim_config(task_cfg)
    except Exception as err:  # noqa: BLE001 - any config error, reported in one line
        raise FedsimError(f"grid point #{num} ({' '.join(filter_overrides(overrides))}): "
                          f"{format_error(err)}") from err


def pool_bundles(sim: "SimConfig", cluster: dict[str, float]) -> list[dict[str, float]]:
    """One placement-group bundle per worker actor the run will start: the same pool
    size and bundle as :func:`fedsim.engine.worker.make_pool`, which then finds itself in
    this placement group and uses its bundles instead of reserving its own."""
    from fedsim.engine.worker import pool_size, worker_bundle

    size = pool_size(sim, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
    return [worker_bundle(sim) for _ in range(size)]


def check_fits(bundles: list[dict[str, float]], cluster: dict[str, float], num: int,
               overrides: Sequence[str]) -> None:
    """Refuse a grid point whose worker pool can never fit on the cluster."""
    for resource in ("CPU", "GPU"):
        need = sum(b.get(resource, 0.0) for b in bundles)
        have = cluster.get(resource, 0.0)
        if need > have + 1e-9:
            raise FedsimError(
                f"grid point #{num} ({' '.join(filter_overrides(overrides))}): its "
                f"{len(bundles)} worker actors need {need:g} {resource}s, the Ray cluster "
                f"has {have:g} (lower ray.workers or ray.{resource.lower()}s_per_worker)")


def run_job_in_task(hydra_context: Any, sweep_config: DictConfig, task_function: Any,
                    singleton_state: Any) -> JobReturn:
    """Inside the Ray task: Hydra's ``run_job`` for one grid point.

    ``SystemExit`` (fedsim's one-line configuration errors exit 2 after printing
    the line) becomes a failed JobReturn carrying it, so Hydra exits with the same
    code once every point has ended.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job

    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    try:
        ret = run_job(hydra_context=hydra_context, task_function=task_function,
                      config=sweep_config, job_dir_key="hydra.sweep.dir",
                      job_subdir_key="hydra.sweep.subdir")
    except SystemExit as exit_:
        ret = failed_return(sweep_config.hydra.overrides.task, SystemExit(exit_.code))
    if ret.status == JobStatus.FAILED:
        ret.return_value = _picklable(ret._return_value)
    return ret


def _picklable(err: BaseException) -> BaseException:
    """The exception itself if it survives pickling, else a RuntimeError saying what it was."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


def failed_return(overrides: Sequence[str], err: BaseException) -> JobReturn:
    """A JobReturn for a point that failed without one of its own."""
    ret = JobReturn(overrides=[str(o) for o in overrides], status=JobStatus.FAILED)
    ret.return_value = err
    return ret


def _submit(remote_fn: Any, launcher: "FedsimRayLauncher", cfg: DictConfig,
            bundles: list[dict[str, float]]) -> tuple[Any, Any]:
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group(bundles, strategy="PACK")
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    ref = remote_fn.options(scheduling_strategy=strategy).remote(
        launcher.hydra_context, cfg, launcher.task_function, Singleton.get_state())
    return ref, pg


def launch(launcher: "FedsimRayLauncher", job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    """Run every grid point as a Ray task; JobReturns in grid order."""
    from fedsim.simulation import connect_ray

    assert launcher.config is not None
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    nums = [initial_job_idx + i for i in range(len(job_overrides))]
    configs = [job_config(launcher, ov, n, sweep_dir) for ov, n in zip(job_overrides, nums)]
    sims = [sim_config(c, n, ov) for c, n, ov in zip(configs, nums, job_overrides)]

    started = connect_ray(launcher.ray_config)
    import ray
    from ray.util.placement_group import remove_placement_group

    try:
        cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
        bundles = [pool_bundles(s, cluster) for s in sims]
        for b, n, ov in zip(bundles, nums, job_overrides):
            check_fits(b, cluster, n, ov)
        limit = launcher.max_parallel or len(job_overrides)
        log.info(f"Launching {len(job_overrides)} jobs on Ray ({cluster.get('CPU', 0):g} CPUs, "
                 f"{cluster.get('GPU', 0):g} GPUs; at most "
                 f"{launcher.max_parallel or 'as many as fit'} at once), sweep dir {sweep_dir}")
        remote_fn = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(run_job_in_task)
        results: dict[int, JobReturn] = {}
        running: dict[Any, tuple[int, Any, float]] = {}
        queue = list(range(len(job_overrides)))
        try:
            while queue or running:
                while queue and len(running) < limit:
                    i = queue.pop(0)
                    log.info(f"\t#{nums[i]} : {' '.join(filter_overrides(job_overrides[i]))}")
                    ref, pg = _submit(remote_fn, launcher, configs[i], bundles[i])
                    running[ref] = (i, pg, time.perf_counter())
                (ref,), _ = ray.wait(list(running), num_returns=1)
                i, pg, t0 = running.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayError as err:  # the task's process died, ...
                    results[i] = failed_return(job_overrides[i], RuntimeError(
                        f"grid point #{nums[i]}: its Ray task failed: "
                        f"{str(err).strip().splitlines()[0]}"))
                remove_placement_group(pg)
                log.info(f"\t#{nums[i]} : {results[i].status.name.lower()} "
                         f"({time.perf_counter() - t0:.1f} s)")
        finally:
            for ref, (_, pg, _) in running.items():
                ray.cancel(ref, force=True)
                remove_placement_group(pg)
    finally:
        if started:
            ray.shutdown()
    failed = [nums[i] for i, r in results.items() if r.status != JobStatus.COMPLETED]
    if failed:
        log.error(f"{len(failed)} of {len(results)} grid points failed: "
                  + ", ".join(f"#{n}" for n in sorted(failed)))
    return [results[i] for i in range(len(job_overrides))]


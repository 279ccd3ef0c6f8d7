"""Hydra glue for ``scripts/simulate.py``: the schema, and one-line errors.

The library does not need Hydra; this module only turns a composed Hydra config
into a validated :class:`fedsim.config.SimConfig` and turns any configuration
mistake (Hydra's, OmegaConf's or ours) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Any, Callable, Iterator

from fedsim.config import SimConfig
from fedsim.errors import FedsimError

EXIT_USAGE = 2


def register_configs() -> None:
    """Register SimConfig as ``base_config`` so every YAML is checked against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=SimConfig)


def to_sim_config(cfg: Any) -> SimConfig:
    """Convert a composed DictConfig into a validated SimConfig (runs __post_init__)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, SimConfig):  # pragma: no cover - schema registration bug
        raise FedsimError("configuration does not follow fedsim.config.SimConfig")
    return obj


def with_hydra_tracking(sim: SimConfig, hydra_cfg: Any) -> SimConfig:
    """``sim`` with what only Hydra knows filled into ``tracking`` (``tracking=mlflow``):
    in a multirun (``hydra_cfg.mode`` MULTIRUN), a null ``tracking.uri`` becomes a
    file store ``mlruns/`` in the sweep directory, shared by every point (one
    experiment for the sweep), and the tags gain the point's overrides
    (``override.<key>``: value, as given to Hydra), ``hydra.sweep_dir`` and
    ``hydra.job_num``. A single run keeps its store in the run directory."""
    import dataclasses
    from pathlib import Path

    from hydra.types import RunMode

    if sim.tracking.kind == "none" or hydra_cfg.mode != RunMode.MULTIRUN:
        return sim
    from fedsim.results.sweep import parse_overrides
    from fedsim.results.tracking import STORE, file_store_uri

    sweep_dir = Path(str(hydra_cfg.sweep.dir)).absolute()
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    tags = {f"override.{k}": v for k, v in parse_overrides(overrides).items()}
    tags.update({"hydra.sweep_dir": str(sweep_dir), "hydra.job_num": str(hydra_cfg.job.num),
                 "hydra.overrides": " ".join(overrides)}, **sim.tracking.tags)
    uri = sim.tracking.uri if sim.tracking.uri is not None else file_store_uri(sweep_dir / STORE)
    return dataclasses.replace(sim, tracking=dataclasses.replace(sim.tracking, uri=uri,
                                                                 tags=tags))


def objective(summary: Any) -> Any:
    """What a sweeper optimizes (Hydra's Optuna sweeper): the final value of the
    task's primary metric (``summary["primary_metric"]``, e.g. ``eval_accuracy``
    of the last evaluation); None if the run never evaluated."""
    value = (summary.get("final") or {}).get(summary.get("primary_metric"))
    return float(value) if value is not None else None


def _chain(first: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    err: BaseException | None = first
    while err is not None and id(err) not in seen:
        out.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return out


def format_error(err: BaseException) -> str:
    """One line that names the option and what is allowed."""
    chain = _chain(err)
    for e in chain:
        if isinstance(e, FedsimError):
            return str(e)
    text = "\n".join(str(e) for e in chain)
    m = re.search(r"Could not find '([\w/.]+)/([^']+)'.*?Available options in '[^']+':\n"
                  r"((?:\t[^\n]*\n?)+)", text, re.S)
    if m:
        options = ", ".join(o.strip() for o in m.group(3).splitlines() if o.strip())
        return f"{m.group(1).replace('/', '.')}={m.group(2)}: unknown option; allowed: {options}"
    m = re.search(r"Could not override '([^']+)'", text) or re.search(
        r"Key '([^']+)' (?:is not in struct|not in '\w+')", text)
    if m:
        return (f"{m.group(1)}: unknown config key (see conf/config.yaml and fedsim/config.py "
                "for the allowed keys)")
    m = re.search(r"(Value '.*?' (?:of type '.*?' )?could not be converted to \w+|"
                  r"Invalid type assigned: .*?)\n\s*full_key: ([\w.\[\]]+)", text, re.S)
    if m:
        return f"{m.group(2)}: {m.group(1).splitlines()[0]}"
    m = re.search(r"Missing mandatory value: ([\w.]+)", text)
    if m:
        return f"{m.group(1)}: a value is required"
    first = next((line for line in text.splitlines() if line.strip()), repr(err))
    return first.strip()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside a Hydra task: a FedsimError exits 2 with one line (no traceback).

    Raising SystemExit (not an Exception) keeps Hydra from adding its own
    "Error executing job" line.
    """
    try:
        yield
    except FedsimError as err:
        print(f"fedsim: error: {format_error(err)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def run_cli(hydra_main: Callable[[], Any]) -> int:
    """Call a ``@hydra.main`` function; configuration errors exit 2 with one line."""
    import os

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra raise, so we can report in one line
    try:
        hydra_main()
    except (FedsimError, HydraException, OmegaConfBaseException) as err:
        print(f"fedsim: error: {format_error(err)}", file=sys.stderr)
        return EXIT_USAGE
    return 0

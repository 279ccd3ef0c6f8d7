"""MLflow tracking as a callback (``tracking=mlflow``).

One fedsim run is one MLflow run, in the experiment ``tracking.experiment`` of
the tracking store ``tracking.uri`` (null: a file store ``mlruns/`` in the run
directory; ``scripts/simulate.py`` points every point of a multirun at one
store in the sweep directory, so a sweep is one experiment). The MLflow run holds:

- params: the resolved config (:class:`fedsim.config.SimConfig`) flattened to
  dotted keys (``dp.noise_multiplier``), values as text;
- metrics: every numeric, finite value of every round's row at ``step`` = the
  round (a resumed run logs the kept rounds first, so its MLflow run holds the
  whole history); units as in ``metrics.jsonl`` (seconds, MiB);
- tags: ``tracking.tags`` (a multirun point's Hydra overrides as
  ``override.<key>``), ``fedsim.output_dir``, ``fedsim.status`` and
  ``fedsim.stop_reason``;
- artifacts: ``summary.json`` and ``metrics.png`` of the run directory, and
  ``final_weights.npy``: the final global model, flat float32 in the model's
  ``trainable_weights`` order.

It talks to the store through an explicit :class:`mlflow.tracking.MlflowClient`
(no active-run global state), imported only when a run is tracked: plain runs
never import MLflow. A run that fails ends its MLflow run as ``FAILED``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from fedsim.config import TrackingConfig
from fedsim.errors import FedsimError
from fedsim.results.callbacks import Callback, RunContext

STORE = "mlruns"  # the default file store's directory name
_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
_MAX_PARAM_VALUE = 6000  # MLflow's limit on a param's value (characters)
_MAX_TAG_VALUE = 8000
_BAD_KEY = re.compile(r"[^/\w.\- ]")


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """A nested dict (the config as ``asdict``) as ``{dotted.key: text}``; lists
    and empty dicts are one value each."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = json.dumps(obj, default=str) if isinstance(obj, (list, tuple, dict)) else str(obj)
    return {prefix: text[:_MAX_PARAM_VALUE]}


def metric_values(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row's numeric, finite values (not ``round``, the step), keys as
    MLflow allows them (other characters become ``_``)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if (key != "round" and isinstance(value, (int, float, np.number))
                and not isinstance(value, bool) and math.isfinite(float(value))):
            out[_BAD_KEY.sub("_", str(key))] = float(value)
    return out


def file_store_uri(directory: Path) -> str:
    """The ``file:`` URI of a local file store in ``directory`` (absolute)."""
    return Path(directory).absolute().as_uri()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Parallel points creating one experiment in one local file store: a file
    lock makes it one experiment (a tracking server serializes that itself)."""
    if not uri.startswith("file:"):
        yield
        return
    import fcntl
    from urllib.parse import unquote, urlparse

    store = Path(unquote(urlparse(uri).path))
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".fedsim-experiment.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class MlflowTracking(Callback):
    """Logs a run to MLflow (see the module docstring); ``tracking`` says where."""

    def __init__(self, tracking: TrackingConfig) -> None:
        self.tracking = tracking
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self._ended = False

    def _resolve_uri(self, ctx: RunContext) -> str:
        if self.tracking.uri is not None:
            return self.tracking.uri
        if ctx.output_dir is None:
            raise FedsimError("tracking.uri=None: allowed is a tracking URI when the run "
                              "writes no output directory (null means a file store in it)")
        return file_store_uri(ctx.output_dir / STORE)

    def _experiment_id(self) -> str:
        assert self.client is not None and self.uri is not None
        name = self.tracking.experiment
        with _store_lock(self.uri):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return str(found.experiment_id)
            try:
                return str(self.client.create_experiment(name))
            except Exception:  # created meanwhile (by another point, on a server)
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
                return str(found.experiment_id)

    def on_run_start(self, ctx: RunContext) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = self._resolve_uri(ctx)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment_id = self._experiment_id()
            tags = {**self.tracking.tags, "fedsim.status": "running"}
            if ctx.output_dir is not None:
                tags["fedsim.output_dir"] = str(Path(ctx.output_dir).absolute())
            if ctx.first_round > 1:
                tags["fedsim.resumed_from_round"] = str(ctx.first_round - 1)
            run = self.client.create_run(
                experiment_id, run_name=self.tracking.run_name,
                tags={k: v[:_MAX_TAG_VALUE] for k, v in tags.items()})
        except FedsimError:
            raise
        except Exception as err:  # unreachable server, unwritable store, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise FedsimError(f"tracking.uri={self.uri}: MLflow cannot start a run there "
                              f"({type(err).__name__}: {first})") from err
        self.run_id = run_id = str(run.info.run_id)
        params = [Param(k, v) for k, v in sorted(flatten(asdict(ctx.cfg)).items())]
        for i in range(0, len(params), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params[i:i + _PARAMS_PER_BATCH])
        for row in ctx.rows:  # the rounds a resumed run keeps
            if row["round"] < ctx.first_round:
                self._log_row(row)

    def _log_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, int(row["round"]))
                   for k, v in sorted(metric_values(row).items())]
        if metrics and self.run_id is not None:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_round_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        self._log_row(row)

    def on_summary(self, ctx: RunContext, summary: Mapping[str, Any],
                   weights: Optional[np.ndarray]) -> None:
        if self.run_id is None:
            return
        out = ctx.output_dir
        if out is not None:
            for name in ("summary.json", "metrics.png"):
                if (out / name).is_file():
                    self.client.log_artifact(self.run_id, str(out / name))
        if weights is not None:
            with tempfile.TemporaryDirectory(prefix="fedsim-mlflow-") as tmp:
                path = Path(tmp) / "final_weights.npy"
                np.save(path, np.asarray(weights, np.float32).reshape(-1))
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_tag(self.run_id, "fedsim.status", str(summary.get("status")))
        self.client.set_tag(self.run_id, "fedsim.stop_reason",
                            str(summary.get("stop_reason"))[:_MAX_TAG_VALUE])
        self.client.set_terminated(self.run_id, "FINISHED")
        self._ended = True

    def close(self) -> None:
        if self.run_id is not None and not self._ended:
            self._ended = True
            try:  # the run failed (or stopped before its summary): say so in MLflow
                self.client.set_tag(self.run_id, "fedsim.status", "failed")
                self.client.set_terminated(self.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the run's own error is the one to report
                pass


def tracker(tracking: TrackingConfig) -> Optional[Callback]:
    """The callback that ``tracking`` asks for: :class:`MlflowTracking`, or None."""
    return MlflowTracking(tracking) if tracking.kind == "mlflow" else None

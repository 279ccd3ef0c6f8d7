"""What happens around rounds, as callbacks (in the style of pfl-research's).

:func:`fedsim.simulation.run_simulation` builds the parts, runs the rounds and
summarises; everything else a run does on the way (the budget stop, memory
sampling, TensorBoard, MLflow, the metrics file, checkpoints, the progress bar) is a
:class:`Callback` here, called in order. A user's callbacks (``callbacks=`` of
``run_simulation``) see the same :class:`RunContext` and run before the
writers (:func:`default_callbacks`), so what they add to a row is logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from fedsim.config import SimConfig
from fedsim.results.outputs import MetricsLog, Progress, TensorBoardLog


@dataclass
class RunContext:
    """What callbacks can read (and the two actions they can take).

    rows: the metrics rows so far (on resume, the kept rounds first);
    first_round: the first round this call runs; accountant: the run's
    :class:`fedsim.privacy.accounting.PrivacyAccountant`, or None without DP;
    next_event: the accountant's event of the least noisy round that can still
    complete (what a budget stop checks), or None; checkpoint(round): write a
    checkpoint of the state after ``round`` (a no-op without an output
    directory); memory(): resident memory (MiB) of the driver, the server and
    the workers, as metrics keys.
    """

    cfg: SimConfig
    output_dir: Optional[Path]
    rows: list[dict[str, Any]]
    first_round: int
    accountant: Any
    next_event: Any
    checkpoint: Callable[[int], None]
    memory: Callable[[], dict[str, float]]


class Callback:
    """Hooks around a run's rounds; every method is optional."""

    def on_run_start(self, ctx: RunContext) -> None:
        """The actors are up; no round of this call has run yet."""

    def stop_before_round(self, ctx: RunContext, round_num: int) -> Optional[str]:
        """A reason to stop before ``round_num`` runs, or None to run it."""
        return None

    def on_round_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        """``row`` holds the round's metrics; callbacks earlier in the list may
        have added keys, later ones see them."""

    def on_failure(self, ctx: RunContext, last_round: int) -> None:
        """A round failed for good; ``last_round`` is the last one completed."""

    def on_run_end(self, ctx: RunContext) -> None:
        """The last round ran (or a callback stopped the run); actors still up."""

    def on_summary(self, ctx: RunContext, summary: Mapping[str, Any],
                   weights: Any) -> None:
        """The run ended well and its outputs are written (``summary.json`` and
        ``metrics.png`` in ``ctx.output_dir`` when there is one); ``summary`` is
        summary.json's content, ``weights`` the final global model (flat
        float32). Actors are gone; :meth:`close` follows."""

    def close(self) -> None:
        """Always called at the end, also after an error: release files."""


class BudgetStop(Callback):
    """Stop before a round that would raise epsilon above ``dp.max_epsilon``."""

    def stop_before_round(self, ctx: RunContext, round_num: int) -> Optional[str]:
        limit = ctx.cfg.dp.max_epsilon
        if ctx.accountant is None or limit is None:
            return None
        eps_next = ctx.accountant.epsilon_after(ctx.next_event)
        if eps_next > limit:
            return (f"privacy budget: round {round_num} would raise epsilon to "
                    f"{eps_next:.4g} > dp.max_epsilon={limit:g}")
        return None


class MemorySampler(Callback):
    """Every ``memory_every`` rounds, the processes' resident memory in the row."""

    def on_round_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        every = ctx.cfg.memory_every
        if every and row["round"] % every == 0:
            row.update(ctx.memory())


class TensorBoard(Callback):
    """Per-round metrics as TensorBoard events under ``<output>/tb``."""

    def __init__(self) -> None:
        self.board: Optional[TensorBoardLog] = None

    def on_run_start(self, ctx: RunContext) -> None:
        if ctx.output_dir is not None:
            self.board = TensorBoardLog(ctx.output_dir / "tb")

    def on_round_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if self.board:
            self.board.write(row)

    def close(self) -> None:
        if self.board:
            self.board.close()
            self.board = None


class MetricsFile(Callback):
    """One JSON line per round in ``<output>/metrics.jsonl`` (kept rows first)."""

    def __init__(self) -> None:
        self.log: Optional[MetricsLog] = None

    def on_run_start(self, ctx: RunContext) -> None:
        if ctx.output_dir is not None:
            kept = [r for r in ctx.rows if r["round"] < ctx.first_round]
            self.log = MetricsLog(ctx.output_dir / "metrics.jsonl", kept)

    def on_round_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if self.log:
            self.log.write(row)

    def close(self) -> None:
        if self.log:
            self.log.close()
            self.log = None


class Checkpoints(Callback):
    """A checkpoint every ``checkpoint_every`` rounds, after the last round, and
    after the last completed round when a round fails for good."""

    def on_round_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        every = ctx.cfg.checkpoint_every
        if every and row["round"] % every == 0:
            ctx.checkpoint(row["round"])

    def on_failure(self, ctx: RunContext, last_round: int) -> None:
        ctx.checkpoint(last_round)

    def on_run_end(self, ctx: RunContext) -> None:
        ctx.checkpoint(ctx.rows[-1]["round"] if ctx.rows else 0)


class ProgressBar(Callback):
    """The console progress bar (``progress``)."""

    def __init__(self) -> None:
        self.bar: Optional[Progress] = None

    def on_run_start(self, ctx: RunContext) -> None:
        self.bar = Progress(ctx.cfg.rounds - ctx.first_round + 1, ctx.cfg.progress)

    def on_round_end(self, ctx: RunContext, row: dict[str, Any]) -> None:
        if self.bar:
            self.bar.update(row)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None


def default_callbacks(cfg: SimConfig, user: Sequence[Callback] = (),
                      tracker: Optional[Callback] = None) -> list[Callback]:
    """The callbacks a run uses, in the order they are called: the budget stop and
    the memory sampler, then the ``user``'s (so that the keys they add to a row
    are written too), then the writers (TensorBoard, the ``tracker``: MLflow
    with ``tracking=mlflow``, :func:`fedsim.results.tracking.tracker`; the
    metrics file, checkpoints, the progress bar)."""
    out: list[Callback] = [BudgetStop(), MemorySampler(), *user]
    if cfg.tensorboard:
        out.append(TensorBoard())
    if tracker is not None:
        out.append(tracker)
    out += [MetricsFile(), Checkpoints(), ProgressBar()]
    return out

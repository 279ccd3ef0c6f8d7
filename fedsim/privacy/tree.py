"""DP-FTRL's tree aggregation (Kairouz et al., ICML 2021) as TFF builds it, with
host noise of true tails.

TFF's ``DifferentiallyPrivateFactory.tree_aggregation`` is
``NormalizedQuery(TreeResidualSumQuery.build_l2_gaussian_query(C, z), clients_per_round)``
and ``tree_adaptive`` is ``NormalizedQuery(RestartQuery(QAdaClipTreeResSumQuery(...),
PeriodicRoundRestartIndicator(period, warmup)), clients_per_round)`` (TF Privacy 0.9).
TF Privacy's tree aggregators are ``tf.function`` s over float32 buffers whose node
noise is ``tf.random.stateless_normal`` (float32 Box-Muller: bounded tails); here
the same algorithms run in numpy, float64, and every tree node's noise is drawn
from the round's privacy-noise stream (:func:`fedsim.privacy.noise.gaussian`):

- :class:`TreeNoise`: TF Privacy's ``TreeAggregator`` (``efficient=False``) and
  ``EfficientTreeAggregator`` (Honaker 2015; ``efficient=True``, TFF's default),
  step for step: a buffer of one node value per level, ``cumsum`` the noise of
  the prefix sum up to the current round, new node values drawn in the same
  order as TF Privacy draws them. Its state is a fixed-shape array (one row per
  level) so that it checkpoints like any aggregator state.
- the residual: round t releases ``sum_t + cumsum_t - cumsum_{t-1}``, so the
  model (the prefix sum of the releases under server SGD) carries the tree's
  noise of the prefix sum: O(log t) node noises, not t.
- restarts: the tree starts afresh (``reset_state``) after ``dp.restart_every``
  rounds (first after ``dp.restart_warmup`` when set; ``PeriodicRoundRestartIndicator``),
  or at the end of every epoch of ``sampling=epochs``; ``tree_adaptive`` adopts
  its estimated clip at each restart, and only then.
- ``tree_adaptive``'s quantile estimate of the update norms uses a tree-noised
  count too (TF Privacy's ``TreeQuantileEstimatorQuery``: clip 0.5, std
  ``clipped_count_stddev``), restarted with the sum.

Accounting (:mod:`fedsim.privacy.mechanisms.tree_aggregation`): each tree sees a
client at most once when it restarts every epoch of ``sampling=epochs``;
dp-accounting's ``SingleEpochTreeAggregationDpEvent`` per epoch, composed, under
the zero-out neighbouring relation (``REPLACE_SPECIAL``) its RDP needs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import dp_accounting
import numpy as np

from fedsim.aggregation.base import (
    Aggregator,
    Partial,
    below_estimate,
    clip_measurements,
    l2_clipped,
)
from fedsim.config import DPConfig
from fedsim.privacy import noise
from fedsim.privacy.noise import adaptive_clip_noise_params


def tree_levels(steps: int) -> int:
    """Rows a tree's level buffer needs for ``steps`` leaves (one per level of a
    complete binary tree over them, plus the level being built)."""
    return max(1, math.ceil(math.log2(max(int(steps), 1) + 1)) + 1)


class TreeNoise:
    """The noise of TF Privacy's (efficient) tree aggregator, in numpy.

    State: ``{"levels": int64 [L] (-1: empty row), "values": float64 [L, dim],
    "started": bool}``, the level buffer of TF Privacy's ``TreeState`` (levels
    ascending). A tree that has not started draws its first node when first used
    (TF Privacy draws it at ``init_state``/``reset_state``: the same draws, in
    the same order). Node values are ``std`` times standard normals from ``rng``.
    """

    def __init__(self, levels: int, efficient: bool = True) -> None:
        self.levels, self.efficient = int(levels), bool(efficient)

    def empty(self, dim: int = 0) -> dict[str, Any]:
        """A tree that has not started (``dim``: the values' size; 0 until the
        first release, as the aggregator is built before the model's size is known)."""
        return {"levels": np.full(self.levels, -1, np.int64),
                "values": np.zeros((self.levels, int(dim)), np.float64), "started": False}

    @staticmethod
    def _entries(state: Mapping[str, Any]) -> list[tuple[int, np.ndarray]]:
        lv, vals = np.asarray(state["levels"]), np.asarray(state["values"])
        return [(int(lv[i]), vals[i]) for i in range(len(lv)) if lv[i] >= 0]

    def _pack(self, entries: list[tuple[int, np.ndarray]], dim: int) -> dict[str, Any]:
        if len(entries) > self.levels:
            raise RuntimeError(f"the tree outgrew its {self.levels} levels (more rounds "
                               "than it was built for)")
        out = self.empty(dim)
        for i, (lv, v) in enumerate(entries):
            out["levels"][i], out["values"][i] = lv, v
        out["started"] = True
        return out

    def cumsum_and_update(self, state: Mapping[str, Any], draw: Any,
                          dim: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(noise of the current prefix sum, state for the next leaf): TF Privacy's
        ``get_cumsum_and_update``. ``draw()``: one node's noise (float64 [dim])."""
        entries = self._entries(state) if state["started"] else [(0, draw())]
        if self.efficient:
            cumsum = sum((v / (2.0 - 0.5 ** lv) for lv, v in entries),
                         np.zeros(dim, np.float64))
        else:
            cumsum = sum((v for _, v in entries), np.zeros(dim, np.float64))
        level = 0
        new_value = draw()
        while level < len(entries) and entries[level][0] == level:
            if self.efficient:
                new_value = 0.5 * (entries[level][1] + new_value) + draw()
            level += 1
        return cumsum, self._pack([(level, new_value)] + entries[level:], dim)


class Restarts:
    """When the tree restarts: TF Privacy's ``PeriodicRoundRestartIndicator(period,
    warmup)`` (after the ``warmup``-th round, then every ``period``), from the
    round number alone; ``period=None``: never."""

    def __init__(self, period: Optional[int], warmup: Optional[int] = None) -> None:
        self.period, self.warmup = period, (warmup or 0)

    def after(self, rounds_done: int) -> bool:
        """Whether the tree restarts after the ``rounds_done``-th release (1-based)."""
        if self.period is None:
            return False
        return rounds_done % self.period == self.warmup


def restart_schedule(dp: DPConfig, sampling_scheme: str, rounds_per_epoch: Optional[int]
                     ) -> Restarts:
    """The restarts ``dp.restart_every`` asks for: ``epoch`` (sampling=epochs: at the
    end of each epoch; otherwise never), ``never``, or every k rounds after
    ``dp.restart_warmup``."""
    every = dp.restart_every
    if every == "epoch":
        if sampling_scheme == "epochs" and rounds_per_epoch:
            return Restarts(int(rounds_per_epoch))
        return Restarts(None)
    if every == "never" or every is None:
        return Restarts(None)
    return Restarts(int(every), dp.restart_warmup)


def tree_step_counts(rounds: int, restarts: Restarts) -> list[int]:
    """Leaves of each tree over ``rounds`` releases (the last tree may be partial)."""
    counts, current = [], 0
    for r in range(1, int(rounds) + 1):
        current += 1
        if restarts.after(r):
            counts.append(current)
            current = 0
    if current:
        counts.append(current)
    return counts


class TreeAggregator(Aggregator):
    """``dp=tree_aggregation`` and ``dp=tree_adaptive`` in fedsim's aggregation
    protocol (see the module docstring).

    Each record is zeroed if non-finite or above ``zeroing_norm`` (TFF's zeroing),
    then clipped to the current clip C in L2 (``tf.clip_by_global_norm``'s
    ``x * C / max(|x|, C)``). ``finalize`` adds the tree residual noise (std of a
    node: ``z C``, z the sum's share of the noise multiplier under adaptive
    clipping) to the float64 sum and divides by ``clients_per_round``.

    State (fixed structure; the arrays are sized by the first release):
    ``sum_tree``/``count_tree`` (:class:`TreeNoise` states), ``prev_sum``/
    ``prev_count`` (the previous cumulative noise), ``clip`` (the sum's clip,
    float32 as TF's), ``estimate`` (the quantile estimate, float32) and
    ``released`` (releases so far).
    """

    sums_records = True

    def __init__(self, dp: DPConfig, clients_per_round: int, rounds: int,
                 restarts: Restarts, adaptive: bool) -> None:
        self.dp, self.adaptive, self.restarts = dp, bool(adaptive), restarts
        self.clients_per_round = int(clients_per_round)
        levels = tree_levels(max(tree_step_counts(rounds, restarts) or [1]))
        self.tree = TreeNoise(levels, dp.tree_efficient)
        # TF Privacy's TreeQuantileEstimatorQuery builds its count's tree efficient
        self.count_tree = TreeNoise(levels, True)
        self.zeroing_norm = dp.zeroing_norm
        cpr = float(clients_per_round)
        if adaptive:
            count_std = (dp.clipped_count_stddev if dp.clipped_count_stddev is not None
                         else cpr / 20.0)
            self.z_sum, self.count_std = adaptive_clip_noise_params(dp.noise_multiplier, cpr,
                                                                    count_std)
        else:
            self.z_sum, self.count_std = dp.noise_multiplier, 0.0

    def release_event(self) -> dp_accounting.DpEvent:
        """What one release adds, as noise multipliers of its tree nodes (the
        ledger's per-round entry; the run's event is the mechanism's ``run_event``)."""
        if self.adaptive:
            return dp_accounting.ComposedDpEvent([
                dp_accounting.GaussianDpEvent(self.z_sum),
                dp_accounting.GaussianDpEvent(self.count_std / 0.5)])
        return dp_accounting.GaussianDpEvent(self.z_sum)

    # -- server side -----------------------------------------------------------------
    def initial_state(self) -> dict[str, Any]:
        clip = self.dp.initial_l2_norm_clip if self.adaptive else self.dp.l2_norm_clip
        return {"sum_tree": self.tree.empty(), "count_tree": self.count_tree.empty(1),
                "prev_sum": np.zeros(0, np.float64), "prev_count": np.zeros(1, np.float64),
                "clip": np.float32(clip), "estimate": np.float32(clip),
                "released": np.int64(0)}

    def current_clip(self, state: Mapping[str, Any]) -> float:
        return float(state["clip"])

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"clip": float(state["clip"]), "estimate": float(state["estimate"])}

    # -- worker side -----------------------------------------------------------------
    def zero_stats(self) -> dict[str, float]:
        return {"clipped": 0.0, "zeroed": 0.0}

    def zero_partial(self, size: int) -> Partial:
        extras = (np.zeros(1, np.float64),) if self.adaptive else ()
        return Partial(np.zeros(size, np.float64), 0.0, 0, self.zero_stats(), extras)

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        clip = float(np.float32(params["clip"]))
        clipped, norm, zeroed = l2_clipped(delta, clip, self.zeroing_norm)
        extras: tuple[np.ndarray, ...] = ()
        if self.adaptive:
            below = below_estimate(norm, params["estimate"])
            extras = (np.array([below], np.float64),)
        return Partial(clipped, 1.0, 1,
                       {"clipped": float(norm > clip), "zeroed": float(zeroed)}, extras)

    # -- server side, once per round -----------------------------------------------
    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        """The sum's residual noise is drawn first, then the count's."""
        dim = int(partial.total.size)
        clip = float(state["clip"])
        std = self.z_sum * clip
        prev = state["prev_sum"] if np.size(state["prev_sum"]) == dim else np.zeros(dim)
        cum, sum_tree = self.tree.cumsum_and_update(
            state["sum_tree"], lambda: noise.gaussian(rng, dim, std), dim)
        noised = partial.total + cum - prev
        new: dict[str, Any] = {**state, "sum_tree": sum_tree, "prev_sum": cum}
        if self.adaptive:
            cstd = self.count_std
            ccum, count_tree = self.count_tree.cumsum_and_update(
                state["count_tree"], lambda: noise.gaussian(rng, 1, cstd), 1)
            below_sum = float((partial.extras[0] + ccum - state["prev_count"])[0])
            below = np.float32(np.float32(below_sum) / np.float32(self.clients_per_round)
                               + np.float32(0.5))
            below = min(np.float32(1.0), max(np.float32(0.0), below))
            update = np.float32(self.dp.clip_learning_rate) * np.float32(
                below - np.float32(self.dp.target_unclipped_quantile))
            estimate = np.float32(state["estimate"]) * np.exp(-update, dtype=np.float32)
            new.update(count_tree=count_tree, prev_count=ccum, estimate=np.float32(estimate))
        released = int(state["released"]) + 1
        new["released"] = np.int64(released)
        restarted = self.restarts.after(released)
        if restarted:
            new.update(sum_tree=self.tree.empty(dim), prev_sum=np.zeros(dim, np.float64),
                       count_tree=self.count_tree.empty(1), prev_count=np.zeros(1, np.float64))
            if self.adaptive:
                new["clip"] = np.float32(max(float(new["estimate"]), 0.0))
        measurements = clip_measurements(partial, clip, std / self.clients_per_round,
                                         self.release_event())
        measurements["tree_restarted"] = int(restarted)
        if self.adaptive:
            measurements["clip_estimate"] = float(new["estimate"])
        result = (noised / float(self.clients_per_round)).astype(np.float32)
        return result, new, measurements

"""``dp=tree_aggregation``: DP-FTRL (Kairouz et al., ICML 2021) as TFF's
``DifferentiallyPrivateFactory.tree_aggregation`` builds it: each update
clipped to L2 norm ``dp.l2_norm_clip`` (C), the sum released with the residual
of a binary tree's noise (every node N(0, (z C)^2)), so the model carries the
noise of O(log t) nodes after t rounds (:mod:`fedsim.privacy.tree`).

Accounting: no amplification by sampling. Each tree must see a client at most
once: restarted at the end of every epoch of ``sampling=epochs``
(``dp.restart_every=epoch``, or a period dividing the epoch), or every
``p <= sampling.min_sep`` rounds under ``sampling=min_sep``. A client is then
in at most one round of each tree and in ``k`` trees (its participations), and
the run spends ``k`` times dp-accounting's ``SingleEpochTreeAggregationDpEvent``
of the longest tree (RDP ``alpha * ceil(log2(T + 1)) / (2 z^2)``, Kairouz et al.,
appendix D), under the zero-out neighbouring relation it is stated for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import dp_accounting
from dp_accounting import DpEvent

from fedsim.aggregation.base import Aggregator
from fedsim.config import DPConfig, SimConfig
from fedsim.errors import ConfigError
from fedsim.privacy.mechanisms.base import Mechanism

if TYPE_CHECKING:
    from fedsim.privacy.tree import Restarts


class TreeAggregation(Mechanism):
    name = "tree_aggregation"
    correlated = True
    participation = ("epochs", "min_sep")
    adaptive = False

    def check(self, cfg: SimConfig) -> None:
        super().check(cfg)
        from fedsim.cohort.sampling import rounds_per_epoch

        option, dp = f"dp.mechanism={self.name}", cfg.dp
        if dp.accountant != "rdp":
            raise ConfigError("dp.accountant", f"rdp with {option} (dp-accounting's PLD "
                              "accountant has no tree-aggregation event)", dp.accountant)
        every, scheme = dp.restart_every, cfg.sampling.scheme
        if scheme == "epochs":
            epoch = rounds_per_epoch(cfg.clients, cfg.clients_per_round)
            ok = every == "epoch" or (isinstance(every, int) and epoch % every == 0
                                      and dp.restart_warmup is None)
            allowed = f"epoch, or a divisor of the epoch's {epoch} rounds without warmup"
        else:
            b = int(cfg.sampling.min_sep or 1)
            ok = isinstance(every, int) and every <= b and dp.restart_warmup is None
            allowed = f"an integer <= sampling.min_sep={b}, without warmup"
        if not ok:
            raise ConfigError("dp.restart_every", f"{allowed}, with {option} and "
                              f"sampling={scheme} (each tree must see a client at most once)",
                              every)

    def restarts(self, cfg: SimConfig) -> "Restarts":
        from fedsim.cohort.sampling import rounds_per_epoch
        from fedsim.privacy.tree import restart_schedule

        return restart_schedule(cfg.dp, cfg.sampling.scheme,
                                rounds_per_epoch(cfg.clients, cfg.clients_per_round))

    def noise_multipliers(self, dp: DPConfig, clients_per_round: int) -> list[float]:
        """The noise multipliers of its trees (the update sum's; adaptive: and the count's)."""
        return [dp.noise_multiplier]

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        zs = self.noise_multipliers(dp, clients_per_round)
        events = [dp_accounting.GaussianDpEvent(z) for z in zs]
        return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)

    def run_event(self, cfg: SimConfig, rounds: int, dp: Optional[DPConfig] = None) -> DpEvent:
        from fedsim.cohort.sampling import max_participations
        from fedsim.privacy.tree import tree_step_counts

        dp = dp or cfg.dp
        if rounds <= 0:
            return dp_accounting.NoOpDpEvent()
        longest = max(tree_step_counts(rounds, self.restarts(cfg)))
        k = max_participations(cfg.sampling.scheme, rounds, cfg.clients, cfg.clients_per_round,
                               cfg.sampling.min_sep)
        assert k is not None  # (its participation schemes bound it)
        # Under adaptive clipping the sum's and the count's trees (multipliers z_sum
        # and 2 * clipped_count_stddev, of equal depth) compose exactly to one tree
        # of the total z: RDP alpha * depth / 2 * (z_sum^-2 + (2 c)^-2) = alpha *
        # depth / (2 z^2).
        tree = dp_accounting.SingleEpochTreeAggregationDpEvent(dp.noise_multiplier, [longest])
        return dp_accounting.SelfComposedDpEvent(tree, int(k))

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        from fedsim.privacy.tree import TreeAggregator

        return TreeAggregator(cfg.dp, cfg.clients_per_round, cfg.rounds, self.restarts(cfg),
                              self.adaptive)


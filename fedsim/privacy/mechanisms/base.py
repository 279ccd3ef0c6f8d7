"""The mechanism protocol, its defaults, and the resolver of ``dp.mechanism``.

In the style of TF Privacy's ``DPQuery`` and dp-accounting's accountants: few
abstract methods (:meth:`Mechanism.round_event`, :meth:`Mechanism.build_aggregator`),
capabilities asked before anything runs (:attr:`Mechanism.private`,
:attr:`Mechanism.secure_sum`, :attr:`Mechanism.calibratable`), and defaults for
the rest. Importable without TensorFlow: a mechanism imports its aggregator's
module only in :meth:`Mechanism.build_aggregator`, which runs in the actors;
and without dp-accounting (which imports SciPy's signal processing), which
only the methods that make DpEvents import, in the driver and the server, so
that a worker that only trains does not pay for it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional, Union

from fedsim.config import DP_MECHANISMS, DPConfig, SimConfig, build_named
from fedsim.errors import ConfigError
from fedsim.privacy import noise

if TYPE_CHECKING:
    from dp_accounting import DpEvent

    from fedsim.aggregation.base import Aggregator

BUILTIN = {
    "none": "fedsim.privacy.mechanisms.none:NoMechanism",
    "gaussian": "fedsim.privacy.mechanisms.gaussian:Gaussian",
    "gaussian_adaptive": "fedsim.privacy.mechanisms.gaussian_adaptive:GaussianAdaptive",
    "laplace": "fedsim.privacy.mechanisms.laplace:Laplace",
    "distributed_skellam": "fedsim.privacy.mechanisms.distributed_skellam:DistributedSkellam",
    "tree_aggregation": "fedsim.privacy.mechanisms.tree_aggregation:TreeAggregation",
    "tree_adaptive": "fedsim.privacy.mechanisms.tree_adaptive:TreeAdaptive",
    "banded_mf": "fedsim.privacy.mechanisms.banded_mf:BandedMF",
    "blt": "fedsim.privacy.mechanisms.blt:BLT",
}
assert set(BUILTIN) == set(DP_MECHANISMS)


class Mechanism(ABC):
    """One DP mechanism for the aggregate of a round.

    Capabilities (class attributes; the driver and the server ask them):

    - ``private``: it releases noisy aggregates that the accountant charges
      (False only for the plain mean);
    - ``secure_sum``: ``"optional"`` (runs with or without secure aggregation),
      ``"required"`` (its noise is added inside the secure sum) or ``"never"``;
    - ``calibratable``: ``dp.target_epsilon`` can be met by searching the noise
      parameter (:meth:`calibration_event`, :meth:`calibrated`);
    - ``needs_model_size``: its event depends on the model's size ``dim``;
    - ``correlated``: its noise is correlated across rounds, so it is accounted
      over the whole run (:meth:`run_event`), not round by round;
    - ``participation``: the sampling schemes its accounting holds for (empty:
      any);
    - ``fixed_rounds``: its noise is planned for exactly ``rounds`` rounds (a
      resume may not change them).
    """

    name: str = ""
    private: bool = True
    secure_sum: str = "optional"
    calibratable: bool = True
    needs_model_size: bool = False
    correlated: bool = False
    participation: tuple[str, ...] = ()
    fixed_rounds: bool = False

    def check(self, cfg: SimConfig) -> None:
        """Refuse (:class:`ConfigError`, one line) options this mechanism cannot run
        with. The default enforces the capabilities; override to add checks."""
        option = f"dp.mechanism={self.name}"
        if self.secure_sum == "required" and cfg.secagg.protocol == "none":
            raise ConfigError("secagg", f"secagg or secagg_plus with {option} (its noise "
                              "is added inside the secure sum)", cfg.secagg.protocol)
        if self.secure_sum == "never" and cfg.secagg.protocol != "none":
            raise ConfigError("secagg", f"none with {option}", cfg.secagg.protocol)
        if self.participation and cfg.sampling.scheme not in self.participation:
            raise ConfigError("sampling", f"{' or '.join(self.participation)} with {option} "
                              "(its accounting bounds how often a client participates)",
                              cfg.sampling.scheme)
        if not self.calibratable and cfg.dp.target_epsilon is not None:
            raise ConfigError("dp.target_epsilon", f"null with {option} (it cannot be "
                              "calibrated; set its noise)", cfg.dp.target_epsilon)

    @abstractmethod
    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None) -> DpEvent:
        """The DpEvent one round releases, from the config alone, before sampling
        amplification (the accountant adds that): used to calibrate, to check a
        budget before a round runs, and to cross-check the aggregator's own event.
        ``dim``: the model size; ``precision_bits``: secure aggregation's rounding;
        ``noise_shares``: clients whose noise shares the sum holds."""

    def worst_round_event(self, cfg: SimConfig, dim: Optional[int]) -> DpEvent:
        """The event of the least noisy round that can still complete (what a
        budget stop checks); by default the round's event."""
        return self.round_event(cfg.dp, cfg.clients_per_round, dim=dim,
                                precision_bits=cfg.secagg.precision_bits)

    def calibration_event(self, value: float) -> DpEvent:
        """The round's event as a function of the searched noise parameter
        (default: a Gaussian of noise multiplier ``value``)."""
        import dp_accounting

        return dp_accounting.GaussianDpEvent(value)

    def calibrated(self, cfg: SimConfig, value: float) -> DPConfig:
        """``cfg.dp`` with the searched parameter set to ``value``."""
        return dataclasses.replace(cfg.dp, noise_multiplier=value)

    def run_event(self, cfg: SimConfig, rounds: int, dp: Optional[DPConfig] = None) -> DpEvent:
        """Correlated mechanisms: the DpEvent of the first ``rounds`` releases for
        the client that participates most under ``cfg.sampling`` (zero-out
        neighbours: its updates replaced by zeros), with ``dp`` (default
        ``cfg.dp``) as the noise; what the accountant composes instead of round
        events."""
        raise NotImplementedError(f"dp.mechanism={self.name} is accounted per round")

    def noise_sampler(self, dp: DPConfig) -> str:
        """The sampler its noise is drawn from, as ``summary.json`` names it."""
        return noise.GAUSSIAN_SAMPLER

    @abstractmethod
    def build_aggregator(self, cfg: SimConfig) -> "Aggregator":
        """The aggregator that runs this mechanism (called in the actors)."""


def resolve_mechanism(mechanism: Union[str, Mechanism, None]) -> Mechanism:
    """The Mechanism that ``dp.mechanism`` names: a built-in name, a
    ``module:callable`` (a Mechanism subclass or a factory returning one), or a
    Mechanism object given from Python (returned as is)."""
    if isinstance(mechanism, Mechanism):
        return mechanism
    name = "none" if mechanism is None else str(mechanism)
    made = build_named(BUILTIN.get(name, name), "dp.mechanism", Mechanism)
    if not made.name:
        made.name = name
    return made

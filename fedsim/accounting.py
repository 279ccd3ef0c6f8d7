"""Privacy accounting: every noisy release is a DpEvent, composed by dp-accounting.

Each round's release is the event that the DP query itself reports (TF
Privacy's ``get_noised_result`` returns it), wrapped in the sampling the
simulation really used:

- ``sampling=uniform`` (fixed-size cohorts without replacement): the population
  size is public and neighbouring datasets differ by *replacing* one client
  (dp-accounting's ``REPLACE_ONE``). Replacing one clipped update moves the sum
  by up to 2C, twice the add/remove sensitivity that the query's noise
  multiplier refers to, so the event's noise multipliers are halved, then
  wrapped in ``SampledWithoutReplacementDpEvent(clients, clients_per_round, .)``
  (RDP of Wang, Balle and Kasiviswanathan 2019).
- ``sampling=poisson``: neighbours add or remove one client
  (``ADD_OR_REMOVE_ONE``), ``PoissonSampledDpEvent(clients_per_round / clients, .)``.
- Laplace releases under the RDP accountant are composed without sampling
  amplification (dp-accounting's RDP has no subsampled Laplace), an upper bound;
  under PLD with Poisson sampling they are amplified.

The default delta is ``clients ** -1.1``: below 1/clients, the usual ceiling for
a meaningful guarantee over a population of that size.
"""

from __future__ import annotations

import math
from typing import Callable

import dp_accounting
import numpy as np
from dp_accounting import DpEvent, NeighboringRelation
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedsim.config import DPConfig, SimConfig
from fedsim.errors import ConfigError


def default_delta(clients: int) -> float:
    """``clients ** -1.1``."""
    return float(clients) ** -1.1


def target_delta(cfg: SimConfig) -> float:
    return cfg.dp.delta if cfg.dp.delta is not None else default_delta(cfg.clients)


def mechanism_event(dp: DPConfig, clients_per_round: int, dim: int | None = None,
                    precision_bits: int = 16) -> DpEvent:
    """The DpEvent that one round's query will report, from the config alone
    (used to calibrate noise and to check a budget before a round runs).
    ``dim`` (the model size) and ``precision_bits`` matter for distributed_skellam."""
    if dp.mechanism == "distributed_skellam":
        from fedsim.distributed_dp import SkellamAggregator

        if dim is None:
            raise ValueError("the distributed Skellam event depends on the model size (dim)")
        agg = SkellamAggregator(dp, precision_bits, clients_per_round)
        return agg.event(clients_per_round, dim)
    if dp.mechanism == "gaussian":
        return dp_accounting.GaussianDpEvent(dp.noise_multiplier)
    if dp.mechanism == "gaussian_adaptive":
        from fedsim.privacy import adaptive_clip_noise_params

        z_sum, count_std = adaptive_clip_noise_params(dp.noise_multiplier,
                                                      float(clients_per_round),
                                                      dp.clipped_count_stddev)
        return dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_sum),
                                              dp_accounting.GaussianDpEvent(count_std / 0.5)])
    if dp.mechanism == "laplace":
        return dp_accounting.LaplaceDpEvent(1.0 / dp.epsilon)
    return dp_accounting.NoOpDpEvent()


def _scale_noise(event: DpEvent, factor: float) -> DpEvent:
    """Multiply every Gaussian/Laplace noise multiplier in ``event`` by ``factor``."""
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return dp_accounting.GaussianDpEvent(event.noise_multiplier * factor)
    if isinstance(event, dp_accounting.LaplaceDpEvent):
        return dp_accounting.LaplaceDpEvent(event.noise_multiplier * factor)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return dp_accounting.ComposedDpEvent([_scale_noise(e, factor) for e in event.events])
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return dp_accounting.SelfComposedDpEvent(_scale_noise(event.event, factor), event.count)
    return event


def _has_laplace(event: DpEvent) -> bool:
    if isinstance(event, dp_accounting.LaplaceDpEvent):
        return True
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return any(_has_laplace(e) for e in event.events)
    return False


def _noiseless(event: DpEvent) -> bool:
    """Whether some release in ``event`` adds no noise (then epsilon is infinite)."""
    if isinstance(event, (dp_accounting.GaussianDpEvent, dp_accounting.LaplaceDpEvent)):
        return event.noise_multiplier == 0
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return True
    inner = getattr(event, "event", None)
    if inner is not None:
        return _noiseless(inner)
    return any(_noiseless(e) for e in getattr(event, "events", ()))


def _gaussian_equivalent(event: DpEvent) -> DpEvent:
    """Composed Gaussians as the one Gaussian they equal: z = (sum z_i^-2)^-1/2.

    Exact (the privacy loss of composed Gaussian mechanisms is that of one
    Gaussian); PLD's Poisson-sampled events need a single Gaussian inside.
    """
    if isinstance(event, dp_accounting.ComposedDpEvent) and all(
            isinstance(e, dp_accounting.GaussianDpEvent) for e in event.events):
        zs = [e.noise_multiplier for e in event.events]
        if any(z == 0 for z in zs):
            return dp_accounting.GaussianDpEvent(0.0)
        return dp_accounting.GaussianDpEvent(sum(z ** -2 for z in zs) ** -0.5)
    return event


def round_down_noise(event: DpEvent, digits: int = 6) -> DpEvent:
    """``event`` with every noise multiplier rounded DOWN to ``digits`` significant
    digits: conservative (less noise, so epsilon can only grow, by a relative
    1e-6 at most), and it keeps TF's float32 jitter in the adaptive query's
    state from making every round's event a new one."""
    def down(z: float) -> float:
        if z <= 0 or not math.isfinite(z):
            return z
        r = float(f"{z:.{digits}g}")  # nearest; exact when z has <= digits digits
        if r > z:  # step down one unit in the last kept digit
            r = float(f"{r - 10.0 ** (math.floor(math.log10(r)) - digits + 1):.{digits}g}")
        return min(r, z)

    if isinstance(event, dp_accounting.GaussianDpEvent):
        return dp_accounting.GaussianDpEvent(down(event.noise_multiplier))
    if isinstance(event, dp_accounting.LaplaceDpEvent):
        return dp_accounting.LaplaceDpEvent(down(event.noise_multiplier))
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return dp_accounting.ComposedDpEvent([round_down_noise(e, digits) for e in event.events])
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        return dp_accounting.PoissonSampledDpEvent(event.sampling_probability,
                                                   round_down_noise(event.event, digits))
    if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
        return dp_accounting.SampledWithoutReplacementDpEvent(
            event.source_dataset_size, event.sample_size, round_down_noise(event.event, digits))
    return event


class PrivacyAccountant:
    """Composes round events; reports epsilon at a fixed delta.

    kind: ``rdp`` (dp-accounting's RdpAccountant) or ``pld`` (PLDAccountant).
    The ledger lists ``[event, count]`` of the round events composed so far,
    equal events merged (composition is commutative), in order of first use. Under RDP each distinct event's RDP curve
    is computed once by an RdpAccountant and the curves are summed (RDP
    composes additively), so a round costs microseconds, not the ~0.3 s of a
    fresh subsampled-Gaussian RDP computation.
    """

    def __init__(self, kind: str, sampling: str, clients: int, clients_per_round: int,
                 delta: float) -> None:
        self.kind = kind
        self.sampling = sampling
        self.clients = int(clients)
        self.clients_per_round = int(clients_per_round)
        self.delta = float(delta)
        self.relation = (NeighboringRelation.REPLACE_ONE if sampling == "uniform"
                         else NeighboringRelation.ADD_OR_REMOVE_ONE)
        self.ledger: list[list] = []
        self._rdp_cache: dict[str, RdpAccountant] = {}

    def fresh(self) -> dp_accounting.PrivacyAccountant:
        """A new, empty dp-accounting accountant of this kind and relation."""
        if self.kind == "pld":
            return PLDAccountant(self.relation)
        return RdpAccountant(neighboring_relation=self.relation)

    def round_event(self, mechanism: DpEvent) -> DpEvent:
        """Wrap one round's mechanism event in the round's sampling."""
        if isinstance(mechanism, dp_accounting.NoOpDpEvent):
            return mechanism
        from fedsim.distributed_dp import SkellamDpEvent

        if isinstance(mechanism, SkellamDpEvent):
            # No subsampled-Skellam RDP bound is implemented: compose unamplified.
            if self.relation == NeighboringRelation.REPLACE_ONE:
                return SkellamDpEvent(2 * mechanism.l1_sensitivity,
                                      2 * mechanism.l2_sensitivity, mechanism.variance)
            return mechanism
        if self.sampling == "uniform":
            replace_one = _scale_noise(mechanism, 0.5)  # sensitivity doubles
            if _has_laplace(replace_one):
                return replace_one
            return dp_accounting.SampledWithoutReplacementDpEvent(
                self.clients, self.clients_per_round, replace_one)
        if _has_laplace(mechanism) and self.kind == "rdp":
            return mechanism
        if self.kind == "pld":
            mechanism = _gaussian_equivalent(mechanism)
        return dp_accounting.PoissonSampledDpEvent(self.clients_per_round / self.clients,
                                                   mechanism)

    def mechanism(self, event: DpEvent) -> DpEvent:
        """The mechanism event that :meth:`round_event` wrapped into ``event``: its
        inverse (up to the ledger's rounding down of noise, which stays on the
        side of less noise)."""
        from fedsim.distributed_dp import SkellamDpEvent

        if isinstance(event, SkellamDpEvent):
            if self.relation == NeighboringRelation.REPLACE_ONE:
                return SkellamDpEvent(event.l1_sensitivity / 2, event.l2_sensitivity / 2,
                                      event.variance)
            return event
        if isinstance(event, dp_accounting.NoOpDpEvent):
            return event
        if self.sampling == "uniform":
            if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
                event = event.event
            return _scale_noise(event, 2.0)  # back to the add/remove sensitivity
        if isinstance(event, dp_accounting.PoissonSampledDpEvent):
            return event.event
        return event  # Laplace under RDP: composed unamplified, unwrapped

    def restore(self, ledger: list[list]) -> None:
        """Continue from a checkpoint's ledger (epsilon never resets)."""
        self.ledger = [[event, int(count)] for event, count in ledger]

    def record(self, event: DpEvent) -> None:
        """Compose one round's event (from :meth:`round_event`)."""
        event = round_down_noise(event)
        for entry in self.ledger:
            if entry[0] == event:
                entry[1] += 1
                return
        self.ledger.append([event, 1])

    def _epsilon(self, entries: list[list]) -> float:
        if not entries:
            return 0.0
        if any(_noiseless(event) for event, _ in entries):
            return math.inf  # dp-accounting's RDP of a noiseless sampled release divides by 0
        if self.kind == "pld":
            acct = self.fresh()
            for event, count in entries:
                acct.compose(event, count)
            return float(acct.get_epsilon(self.delta))
        total = None
        for event, count in entries:
            key = repr(event)
            if key not in self._rdp_cache:
                self._rdp_cache[key] = self._event_rdp(event)
            rdp = count * self._rdp_cache[key]
            total = rdp if total is None else total + rdp
        return float(rdp_privacy_accountant.compute_epsilon(self._orders, total, self.delta)[0])

    @property
    def _orders(self) -> np.ndarray:
        return np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)

    def _event_rdp(self, event: DpEvent) -> np.ndarray:
        """The RDP curve of one event at the default orders: dp-accounting's, or
        the Skellam bound (fedsim.distributed_dp) for Skellam releases."""
        from fedsim.distributed_dp import SkellamDpEvent, skellam_rdp

        if isinstance(event, SkellamDpEvent):
            return skellam_rdp(event, self._orders)
        one = RdpAccountant(self._orders, neighboring_relation=self.relation)
        one.compose(event)
        return one.rdp

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before any release)."""
        return self._epsilon(self.ledger)

    def epsilon_after(self, event: DpEvent) -> float:
        """Epsilon if ``event`` were composed next (the ledger is unchanged)."""
        return self._epsilon(self.ledger + [[round_down_noise(event), 1]])

    def add_remove_twin(self, clients_per_round: int | None = None) -> "PrivacyAccountant":
        """The add/remove, Poisson-sampled accountant of this ledger's mechanism events:
        what they spend for a participant that joins each round independently with
        probability ``clients_per_round / clients`` (default: this accountant's
        cohort), as the canaries of :mod:`fedsim.audit` do. Same kind, delta and
        rules (Laplace under RDP stays unamplified). Derived from the ledger, so it
        covers the rounds before a resume too; with ``sampling=poisson`` and the
        same cohort size it is this accountant."""
        twin = PrivacyAccountant(self.kind, "poisson", self.clients,
                                 clients_per_round or self.clients_per_round, self.delta)
        for event, count in self.ledger:
            wrapped = round_down_noise(twin.round_event(self.mechanism(event)))
            for entry in twin.ledger:
                if entry[0] == wrapped:
                    entry[1] += count
                    break
            else:
                twin.ledger.append([wrapped, int(count)])
        return twin


def audit_comparison(accountant: PrivacyAccountant | None,
                     clients_per_round: int) -> dict[str, object]:
    """The accountant figure a canary audit is set beside: the add/remove epsilon of
    the run's mechanism events under Poisson sampling at ``clients_per_round /
    clients``, how canaries join a run whatever the real clients' sampling (for
    fixed-size cohorts the run's own epsilon is the replace-one one: a different
    quantity, and a larger one)."""
    if accountant is None:
        return {"accountant_epsilon_add_remove": None, "accountant_delta_add_remove": None,
                "compared_with": "nothing: the run has no DP mechanism, hence no accountant"}
    twin = accountant.add_remove_twin(clients_per_round)
    eps = twin.epsilon()
    return {"accountant_epsilon_add_remove": eps if math.isfinite(eps) else "inf",
            "accountant_delta_add_remove": twin.delta,
            "compared_with": (f"the {twin.kind} accountant's epsilon of the run's mechanism "
                              f"events for an add/remove neighbour Poisson-sampled with q = "
                              f"{twin.clients_per_round}/{twin.clients}, as each canary joins")}


def build_accountant(cfg: SimConfig) -> PrivacyAccountant:
    """The run's accountant. It charges for the *sampled* cohort: with
    over-selection that is more than ``clients_per_round`` (:mod:`fedsim.faults`)."""
    from fedsim.faults import sample_size

    return PrivacyAccountant(cfg.dp.accountant, cfg.sampling, cfg.clients,
                             sample_size(cfg.clients_per_round, cfg.faults, cfg.clients),
                             target_delta(cfg))


def calibrate(cfg: SimConfig) -> DPConfig:
    """A copy of ``cfg.dp`` whose noise spends exactly ``dp.target_epsilon`` over
    ``rounds`` rounds at the target delta (dp-accounting's calibration search)."""
    import dataclasses

    dp = cfg.dp
    acct = build_accountant(cfg)
    # The parameter is the noise multiplier: 1 / per-round epsilon for Laplace; the
    # total z for Gaussian (adaptive clipping splits z between two Gaussians whose
    # composition is exactly one Gaussian of multiplier z).
    base = dp_accounting.LaplaceDpEvent if dp.mechanism == "laplace" else \
        dp_accounting.GaussianDpEvent

    def make(nm: float) -> DpEvent:
        return dp_accounting.SelfComposedDpEvent(acct.round_event(base(nm)), cfg.rounds)

    fresh: Callable[[], dp_accounting.PrivacyAccountant] = acct.fresh
    value = dp_accounting.calibrate_dp_mechanism(
        fresh, make, dp.target_epsilon, acct.delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6)
    value = float(value)
    if dp.mechanism == "laplace":
        return dataclasses.replace(dp, epsilon=1.0 / value, target_epsilon=dp.target_epsilon)
    new = dataclasses.replace(dp, noise_multiplier=value)
    if dp.mechanism == "gaussian_adaptive":
        count_std = (dp.clipped_count_stddev if dp.clipped_count_stddev is not None
                     else 0.05 * cfg.clients_per_round)
        if value >= 2 * count_std:
            raise ConfigError("dp.target_epsilon", f"a budget that needs a noise multiplier "
                              f"below 2 * clipped_count_stddev = {2 * count_std:g} (it needs "
                              f"{value:.4g}); raise dp.target_epsilon or dp.clipped_count_stddev",
                              dp.target_epsilon)
    return new

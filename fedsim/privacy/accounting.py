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
- ``sampling=epochs`` and ``sampling=min_sep`` (fixed schedules: a client is in
  at most one round of an epoch, or one of any ``min_sep`` consecutive rounds):
  no amplification. Neighbours replace one client's updates by zeros (the
  zero-out relation, dp-accounting's ``REPLACE_SPECIAL``, the one DP-FTRL and
  matrix factorization are stated for; for a Gaussian mechanism it is the
  add/remove sensitivity, which the PLD accountant uses). The run's event is
  that of the client that participates most: ``k`` of its rounds, ``k`` from the
  schedule (:func:`fedsim.cohort.sampling.max_participations`); a mechanism
  whose noise is correlated across rounds states it itself
  (:meth:`~fedsim.privacy.mechanisms.base.Mechanism.run_event`).
- Laplace releases under the RDP accountant are composed without sampling
  amplification (dp-accounting's RDP has no subsampled Laplace), an upper bound;
  under PLD with Poisson sampling they are amplified.

- Under secure aggregation the clipped updates are fixed-point encoded with
  stochastic rounding before they are summed, which can move an update by up
  to one integer unit per coordinate: ``sqrt(d) / scale`` in L2 and
  ``d / scale`` in L1, with ``scale = 2^precision_bits / clip``. The central
  mechanisms' events are charged for that rounded sensitivity
  (:func:`rounded_sensitivity_event`), as the Skellam bound already is.

The default delta is ``clients ** -1.1``: below 1/clients, the usual ceiling for
a meaningful guarantee over a population of that size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import dp_accounting
import numpy as np
from dp_accounting import DpEvent, NeighboringRelation
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedsim.config import DPConfig, SimConfig, saved_sampling_scheme
from fedsim.errors import ConfigError, FedsimError
from fedsim.privacy.events import (
    DiscreteGaussianDpEvent,
    SkellamDpEvent,
    discrete_gaussian_rdp,
    skellam_rdp,
)
from fedsim.privacy.mechanisms.base import resolve_mechanism

CALIBRATION_HEADROOM = 2e-5
"""Relative extra noise of a calibrated noise multiplier: the accountant records
noise multipliers rounded down to 6 significant digits (a relative 1e-5 at most)
after TF's float32 state has jittered them, so this keeps every recorded event
at least as noisy as the one calibrated to spend exactly the target."""


class LedgerError(FedsimError):
    """A ledger of events that this accountant cannot compose (one line)."""


UNAMPLIFIED = ("epochs", "min_sep")
"""Sampling schemes whose schedules bound each client's participations instead of
amplifying by sampling."""


def default_delta(clients: int) -> float:
    """``clients ** -1.1``."""
    return float(clients) ** -1.1


def target_delta(cfg: SimConfig) -> float:
    return cfg.dp.delta if cfg.dp.delta is not None else default_delta(cfg.clients)


def mechanism_event(dp: DPConfig, clients_per_round: int, dim: int | None = None,
                    precision_bits: int = 16, *, noise_shares: int | None = None,
                    mechanism: Any = None) -> DpEvent:
    """The DpEvent that one round's query will report, from the config alone
    (used to calibrate noise and to check a budget before a round runs): the
    mechanism's :meth:`~fedsim.privacy.mechanisms.base.Mechanism.round_event`.
    ``mechanism``: a Mechanism object (default: the one ``dp.mechanism`` names)."""
    mech = resolve_mechanism(mechanism if mechanism is not None else dp.mechanism)
    return mech.round_event(dp, clients_per_round, dim=dim, precision_bits=precision_bits,
                            noise_shares=noise_shares)


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


def rounded_sensitivity_factors(dim: int, precision_bits: int) -> tuple[float, float]:
    """(L2, L1) factors by which stochastic fixed-point rounding can raise a
    clipped update's norm under secure aggregation.

    With ``scale = 2^precision_bits / clip`` integer units per 1.0 (the update
    segment's codec, :func:`fedsim.secure.fixedpoint.FixedPointCodec.for_sum`), each
    coordinate moves by less than one unit, so a vector of ``dim`` coordinates
    clipped to L2 norm ``C`` has L2 norm below ``C + sqrt(dim) / scale = C (1 +
    sqrt(dim) 2^-p)`` after rounding, and one clipped to L1 norm ``s`` has L1
    norm below ``s (1 + dim 2^-p)``. The factors do not depend on the clip.
    The adaptive clip's count segment (records of +-0.5, one coordinate) grows
    by ``1 + 2^-p`` at most, below the update's L2 factor, which is used for both.
    """
    step = 2.0 ** -int(precision_bits)
    return 1.0 + math.sqrt(int(dim)) * step, 1.0 + int(dim) * step


def rounded_sensitivity_event(event: DpEvent, dim: int, precision_bits: int) -> DpEvent:
    """``event`` charged for the rounded sensitivity of secure aggregation: every
    Gaussian noise multiplier divided by the L2 factor, every Laplace one by the
    L1 factor (:func:`rounded_sensitivity_factors`). Events that account for
    rounding themselves (Skellam) are returned as they are."""
    l2, l1 = rounded_sensitivity_factors(dim, precision_bits)

    def scale(e: DpEvent) -> DpEvent:
        if isinstance(e, (dp_accounting.GaussianDpEvent, DiscreteGaussianDpEvent)):
            return type(e)(e.noise_multiplier / l2)
        if isinstance(e, dp_accounting.LaplaceDpEvent):
            return dp_accounting.LaplaceDpEvent(e.noise_multiplier / l1)
        if isinstance(e, dp_accounting.SingleEpochTreeAggregationDpEvent):
            return dp_accounting.SingleEpochTreeAggregationDpEvent(e.noise_multiplier / l2,
                                                                   e.step_counts)
        if isinstance(e, dp_accounting.ComposedDpEvent):
            return dp_accounting.ComposedDpEvent([scale(x) for x in e.events])
        if isinstance(e, dp_accounting.SelfComposedDpEvent):
            return dp_accounting.SelfComposedDpEvent(scale(e.event), e.count)
        return e

    return scale(event)


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
    equal events merged (composition is commutative), in order of first use. Under
    RDP each distinct event's RDP curve is computed once by an RdpAccountant and
    the curves are summed (RDP composes additively), so a round costs one addition
    of curves, not a fresh subsampled-Gaussian RDP computation.
    """

    def __init__(self, kind: str, sampling: str, clients: int, clients_per_round: int,
                 delta: float, secure_rounding: tuple[int, int] | None = None,
                 participations: Callable[[int], int] | None = None,
                 run_event: Callable[[int, DPConfig | None], DpEvent] | None = None) -> None:
        """secure_rounding: ``(model size, secagg.precision_bits)`` when updates are
        fixed-point encoded for secure aggregation: :meth:`round_event` then
        charges the rounded sensitivity (:func:`rounded_sensitivity_event`).
        participations (``sampling=epochs|min_sep``): the most rounds one client is
        in among the first r. run_event: a correlated mechanism's event of the
        first r releases (with the given DP config, default the run's)."""
        self.secure_rounding = secure_rounding
        self.kind = kind
        self.sampling = sampling
        self.clients = int(clients)
        self.clients_per_round = int(clients_per_round)
        self.delta = float(delta)
        self.participations = participations
        self.run_event = run_event
        self.unamplified = sampling in UNAMPLIFIED
        if self.unamplified and (participations is None and run_event is None):
            raise ValueError(f"sampling={sampling} needs the clients' participations")
        if sampling == "uniform":
            self.relation = NeighboringRelation.REPLACE_ONE
        elif self.unamplified and kind == "rdp":
            self.relation = NeighboringRelation.REPLACE_SPECIAL
        else:
            self.relation = NeighboringRelation.ADD_OR_REMOVE_ONE
        self.ledger: list[list] = []
        self._rdp_cache: dict[str, RdpAccountant] = {}

    def fresh(self) -> dp_accounting.PrivacyAccountant:
        """A new, empty dp-accounting accountant of this kind and relation."""
        if self.kind == "pld":
            return PLDAccountant(self.relation)
        return RdpAccountant(neighboring_relation=self.relation)

    def round_event(self, mechanism: DpEvent) -> DpEvent:
        """Charge one round's mechanism event for rounding under secure
        aggregation, and wrap it in the round's sampling."""
        if isinstance(mechanism, dp_accounting.NoOpDpEvent):
            return mechanism
        if self.secure_rounding is not None:
            mechanism = rounded_sensitivity_event(mechanism, *self.secure_rounding)
        if self.unamplified:  # no amplification, zero-out neighbours: as released
            return mechanism

        if isinstance(mechanism, DiscreteGaussianDpEvent):
            # No amplification claimed (fedsim.privacy.discrete_gaussian); replacing a client
            # doubles the sensitivity.
            if self.relation == NeighboringRelation.REPLACE_ONE:
                return DiscreteGaussianDpEvent(mechanism.noise_multiplier / 2)
            return mechanism
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

        if isinstance(event, SkellamDpEvent):
            if self.relation == NeighboringRelation.REPLACE_ONE:
                return SkellamDpEvent(event.l1_sensitivity / 2, event.l2_sensitivity / 2,
                                      event.variance)
            return event
        if isinstance(event, dp_accounting.NoOpDpEvent) or self.unamplified:
            return event
        if self.sampling == "uniform":
            if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
                event = event.event
            return _scale_noise(event, 2.0)  # back to the add/remove sensitivity
        if isinstance(event, dp_accounting.PoissonSampledDpEvent):
            return event.event
        return event  # Laplace under RDP: composed unamplified, unwrapped

    def composable(self, event: DpEvent) -> bool:
        """Whether this accountant can compose ``event`` (dp-accounting's
        ``supports``; Skellam releases under RDP through fedsim's own bound)."""

        if isinstance(event, (SkellamDpEvent, DiscreteGaussianDpEvent)):
            return self.kind == "rdp"
        return self.fresh().supports(event)

    def restore(self, ledger: list[list], saved_sampling: str | None = None,
                saved_kind: str | None = None) -> None:
        """Continue from a checkpoint's ledger (epsilon never resets).

        Refused with :class:`LedgerError`, before anything changes, when the
        checkpoint's events were accounted under another neighbouring relation
        (``saved_sampling``: uniform is replace-one, poisson add/remove; epsilons
        under the two are not composable) or when this accountant cannot compose
        one of them (e.g. PLD and sampling without replacement)."""
        saved = f"sampling={saved_sampling}, dp.accountant={saved_kind}"
        fix = (f"resume with the checkpoint's {saved}" if saved_sampling else
               "resume with the checkpoint's sampling and dp.accountant")
        if saved_sampling is not None and saved_sampling != self.sampling:
            raise LedgerError(f"resume: sampling={self.sampling} changes the neighbouring "
                              f"relation of the checkpoint's privacy ledger ({saved}); "
                              f"the rounds spent cannot be composed with new ones; {fix}")
        for event, _ in ledger:
            if not self.composable(event):
                raise LedgerError(f"resume: dp.accountant={self.kind} cannot compose the "
                                  f"checkpoint's privacy ledger ({saved}; e.g. "
                                  f"{type(event).__name__}); {fix}")
        self.ledger = [[event, int(count)] for event, count in ledger]

    def record(self, event: DpEvent) -> None:
        """Compose one round's event (from :meth:`round_event`). A correlated
        mechanism's releases must all be alike (its run is one mechanism)."""
        event = round_down_noise(event)
        if self.run_event is not None and self.ledger and self.ledger[0][0] != event:
            raise LedgerError(f"a correlated-noise mechanism cannot change its noise within "
                              f"a run (the ledger has {self.ledger[0][0]}, this round "
                              f"{event}); start a new run")
        for entry in self.ledger:
            if entry[0] == event:
                entry[1] += 1
                return
        self.ledger.append([event, 1])

    def stream_event(self, entries: list[list], dp: DPConfig | None = None) -> DpEvent:
        """Under ``sampling=epochs|min_sep``: the event of the rounds in ``entries``
        for the client that participates most. A correlated mechanism's
        :meth:`~fedsim.privacy.mechanisms.base.Mechanism.run_event` (with ``dp``,
        default the run's; charged for secure rounding); otherwise the ``k``
        least noisy of the rounds (all alike: ``k`` of them)."""
        rounds = sum(int(c) for _, c in entries)
        if self.run_event is not None:
            event = self.run_event(rounds, dp)
            if self.secure_rounding is not None:
                event = rounded_sensitivity_event(event, *self.secure_rounding)
            return event
        assert self.participations is not None
        k = self.participations(rounds)
        if len(entries) == 1:
            return dp_accounting.SelfComposedDpEvent(entries[0][0], min(k, rounds))
        # different rounds (a resume with new noise): each distinct event up to k
        # times, an upper bound on any k of them
        return dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(e, min(k, c))
                                              for e, c in entries])

    def _epsilon(self, entries: list[list]) -> float:
        if not entries:
            return 0.0
        if any(_noiseless(event) for event, _ in entries):
            return math.inf  # dp-accounting's RDP of a noiseless sampled release divides by 0
        if self.unamplified:
            event = self.stream_event(entries)
            if _noiseless(event):
                return math.inf
            if self.kind == "pld":
                acct = self.fresh()
                acct.compose(event)
                return float(acct.get_epsilon(self.delta))
            return float(rdp_privacy_accountant.compute_epsilon(
                self._orders, self._event_rdp(event), self.delta)[0])
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
        the Skellam bound (fedsim.privacy.skellam) for Skellam releases."""

        if isinstance(event, SkellamDpEvent):
            return skellam_rdp(event, self._orders)
        if isinstance(event, DiscreteGaussianDpEvent):
            return discrete_gaussian_rdp(event, self._orders)
        if isinstance(event, dp_accounting.SelfComposedDpEvent) and isinstance(
                event.event, (SkellamDpEvent, DiscreteGaussianDpEvent)):
            return event.count * self._event_rdp(event.event)
        if isinstance(event, dp_accounting.ComposedDpEvent) and any(
                isinstance(e, (SkellamDpEvent, DiscreteGaussianDpEvent,
                               dp_accounting.SelfComposedDpEvent)) for e in event.events):
            return sum((self._event_rdp(e) for e in event.events), np.zeros(len(self._orders)))
        one = RdpAccountant(self._orders, neighboring_relation=self.relation)
        one.compose(event)
        return one.rdp

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before any release)."""
        return self._epsilon(self.ledger)

    def epsilon_after(self, event: DpEvent, count: int = 1) -> float:
        """Epsilon if ``event`` were composed ``count`` more times (the ledger is
        unchanged)."""
        return self._epsilon(self.ledger + [[round_down_noise(event), int(count)]])

    def add_remove_twin(self, clients_per_round: int | None = None) -> "PrivacyAccountant":
        """The add/remove, Poisson-sampled accountant of this ledger's mechanism events:
        what they spend for a participant that joins each round independently with
        probability ``clients_per_round / clients`` (default: this accountant's
        cohort), as the canaries of :mod:`fedsim.privacy.audit` do. Same kind, delta and
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


def _schedule(cfg: SimConfig, mechanism: Any = None) -> dict[str, Any]:
    """The accountant's participations and run event under ``sampling=epochs|min_sep``."""
    scheme = cfg.sampling.scheme
    if scheme not in UNAMPLIFIED:
        return {}
    from fedsim.cohort.sampling import max_participations

    mech = resolve_mechanism(mechanism if mechanism is not None else cfg.dp.mechanism)

    def participations(rounds: int) -> int:
        k = max_participations(scheme, rounds, cfg.clients, cfg.clients_per_round,
                               cfg.sampling.min_sep)
        assert k is not None  # (epochs and min_sep bound the participations)
        return int(k)

    def run_event(rounds: int, dp: DPConfig | None = None) -> DpEvent:
        return mech.run_event(cfg, rounds, dp)

    return {"participations": participations,
            "run_event": run_event if mech.correlated else None}


def build_accountant(cfg: SimConfig, dim: int | None = None,
                     mechanism: Any = None) -> PrivacyAccountant:
    """The run's accountant. It charges for the *sampled* cohort: with
    over-selection that is more than ``clients_per_round`` (:mod:`fedsim.cohort.faults`).
    Under secure aggregation it needs the model size ``dim`` to charge for
    fixed-point rounding (:func:`rounded_sensitivity_event`)."""
    from fedsim.cohort.faults import sample_size

    rounding = None
    if cfg.secagg.protocol != "none":
        if dim is None:
            raise ValueError("under secure aggregation the accountant needs the model size")
        rounding = (int(dim), cfg.secagg.precision_bits)
    return PrivacyAccountant(cfg.dp.accountant, cfg.sampling.scheme, cfg.clients,
                             sample_size(cfg.clients_per_round, cfg.faults, cfg.clients),
                             target_delta(cfg), rounding, **_schedule(cfg, mechanism))


def check_ledger(cfg: SimConfig, ledger: list[list], saved_config: dict[str, Any]) -> None:
    """Refuse (:class:`LedgerError`, one line) a checkpoint's ledger that ``cfg``'s
    accountant cannot continue (:meth:`PrivacyAccountant.restore`); before any
    actor starts."""
    PrivacyAccountant(cfg.dp.accountant, cfg.sampling.scheme, cfg.clients,
                      cfg.clients_per_round, target_delta(cfg), **_schedule(cfg)).restore(
        ledger, saved_sampling_scheme(saved_config.get("sampling")),
        (saved_config.get("dp") or {}).get("accountant"))


def _round_up(value: float, digits: int = 6) -> float:
    """``value`` rounded UP to ``digits`` significant digits (exactly representable
    as its decimal string, so :func:`round_down_noise` leaves it unchanged)."""
    r = float(f"{value:.{digits}g}")
    if r < value:
        r = float(f"{r + 10.0 ** (math.floor(math.log10(r)) - digits + 1):.{digits}g}")
    return r


def calibrate(cfg: SimConfig, ledger: list[list] | None = None, rounds_done: int = 0,
              dim: int | None = None, mechanism: Any = None) -> DPConfig:
    """A copy of ``cfg.dp`` whose noise spends at most ``dp.target_epsilon`` (and
    within a relative ``CALIBRATION_HEADROOM`` of it) over the whole run at the
    target delta: the ``ledger`` already spent (a resumed run's ``rounds_done``
    rounds) plus ``rounds - rounds_done`` rounds of the calibrated mechanism
    (dp-accounting's calibration search). ``dim``: the model size, needed under
    secure aggregation (rounding is charged). The noise multiplier is raised by
    the headroom and rounded up to 6 significant digits, so that the events the
    accountant records (rounded down to 6 digits) are never less noisy than the
    calibrated one, and ``dp.max_epsilon = dp.target_epsilon`` lets the last
    round run. Raises :class:`ConfigError` when the ledger alone already
    reaches the target."""
    dp = cfg.dp
    acct = build_accountant(cfg, dim, mechanism)
    remaining = cfg.rounds - rounds_done
    spent = [[e, int(c)] for e, c in (ledger or [])]
    if spent:
        acct.restore(spent)
        already = acct.epsilon()
        assert dp.target_epsilon is not None  # (calibrate is only called with a target)
        if already >= dp.target_epsilon or remaining <= 0:
            raise ConfigError("dp.target_epsilon", f"more than the epsilon {already:.4g} "
                              f"that the checkpoint's {rounds_done} rounds already spent, with "
                              "rounds left to run", dp.target_epsilon)
    # The searched parameter is the mechanism's (e.g. the total z for Gaussian,
    # 1 / per-round epsilon for Laplace).
    mech = resolve_mechanism(mechanism if mechanism is not None else dp.mechanism)
    base = mech.calibration_event

    def make(nm: float) -> DpEvent:
        if acct.run_event is not None:  # correlated noise: the whole run is one mechanism
            return acct.stream_event([[None, cfg.rounds]],
                                     dataclasses.replace(dp, noise_multiplier=nm))
        if acct.unamplified:
            return acct.stream_event([[acct.round_event(base(nm)), cfg.rounds]])
        new = dp_accounting.SelfComposedDpEvent(acct.round_event(base(nm)), remaining)
        return dp_accounting.ComposedDpEvent(
            [dp_accounting.SelfComposedDpEvent(e, c) for e, c in spent] + [new])

    fresh: Callable[[], dp_accounting.PrivacyAccountant] = acct.fresh
    value = dp_accounting.calibrate_dp_mechanism(
        fresh, make, dp.target_epsilon, acct.delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-6)
    value = _round_up(float(value) * (1.0 + CALIBRATION_HEADROOM))
    return mech.calibrated(cfg, value)

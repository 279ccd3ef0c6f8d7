"""Builds the parts of a run that the config (or the caller) names; the actors
call these factories."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedsim.aggregation.base import Aggregator
from fedsim.config import SimConfig
from fedsim.errors import FedsimError
from fedsim.privacy.mechanisms.base import resolve_mechanism


def build_aggregator(cfg: SimConfig, mechanism: Any = None) -> Aggregator:
    """The aggregator of the run: ``aggregator.kind=tff``, a TFF aggregation factory
    run by :class:`fedsim.interop.tff.TFFAggregator` (cheap to build: TFF is only
    imported in the server actor, when it is first used); a robust kind
    (``median``, ``trimmed_mean``, ``krum``, ``multi_krum``, ``bulyan``), its
    :class:`fedsim.aggregation.robust.RobustAggregator` (the config allows it only
    with ``dp=none``); otherwise the one that
    the DP mechanism builds (``mechanism``, a Mechanism object, or the one
    ``cfg.dp.mechanism`` names; ``none`` is the weighted mean).
    """
    if cfg.aggregator.kind == "tff":
        from fedsim.interop.tff import build_tff_aggregator

        return build_tff_aggregator(cfg)
    if cfg.aggregator.robust:
        return build_robust_aggregator(cfg)
    return resolve_mechanism(mechanism if mechanism is not None
                             else cfg.dp.mechanism).build_aggregator(cfg)


def build_robust_aggregator(cfg: SimConfig) -> Aggregator:
    """The :class:`fedsim.aggregation.robust.RobustAggregator` that
    ``cfg.aggregator`` names (its kind and options,
    :class:`fedsim.config.AggregatorConfig`)."""
    agg = cfg.aggregator
    if agg.kind == "median":
        from fedsim.aggregation.median import MedianAggregator

        return MedianAggregator(clip=agg.clip)
    if agg.kind == "trimmed_mean":
        from fedsim.aggregation.trimmed_mean import TrimmedMeanAggregator

        return TrimmedMeanAggregator(agg.beta, clip=agg.clip)
    if agg.kind in ("krum", "multi_krum"):
        from fedsim.aggregation.krum import KrumAggregator

        multi = agg.kind == "multi_krum"
        return KrumAggregator(agg.byzantine, agg.select if multi else 1, multi=multi,
                              clip=agg.clip)
    if agg.kind == "bulyan":
        from fedsim.aggregation.bulyan import BulyanAggregator

        return BulyanAggregator(agg.byzantine, clip=agg.clip)
    raise ValueError(f"not a robust aggregator kind: {agg.kind!r}")


@dataclass(frozen=True)
class Parts:
    """The run's pluggable parts, resolved once in the driver and shipped to the
    actors (they must pickle): the model (a :class:`fedsim.models.spec.ModelSpec`),
    the DP mechanism (:class:`fedsim.privacy.mechanisms.base.Mechanism`) and the
    server algorithm (:class:`fedsim.algorithms.base.Algorithm`)."""

    model: Any
    mechanism: Any
    algorithm: Any


def resolve_parts(cfg: SimConfig, *, model: Any = None, mechanism: Any = None,
                  algorithm: Any = None) -> Parts:
    """The parts ``cfg`` names, or the objects given instead (what
    :func:`fedsim.simulation.run_simulation` ships to the actors)."""
    from fedsim.algorithms.base import resolve_algorithm
    from fedsim.models.spec import model_spec

    return Parts(model_spec(cfg.model, model),
                 resolve_mechanism(mechanism if mechanism is not None else cfg.dp.mechanism),
                 resolve_algorithm(algorithm if algorithm is not None else cfg.algorithm, cfg))


class _Discard:
    """A file that forgets what is written to it (bytes, or protocol 5's
    PickleBuffers of large arrays), counting the bytes."""

    def __init__(self) -> None:
        self.nbytes = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.nbytes += n
        return n


def check_sendable(obj: Any, option: str) -> None:
    """Refuse, before any actor starts, an object given from Python that Ray
    cannot send to the actors: one-line FedsimError naming ``option`` and why.

    Pickles ``obj`` as Ray does (with Ray's cloudpickle: lambdas and closures
    are fine, a lock, an open file or a live connection inside them are not)
    into a sink that keeps nothing.
    """
    from ray import cloudpickle

    try:
        cloudpickle.dump(obj, _Discard(), protocol=5)
    except Exception as err:
        reason = (str(err).splitlines() or [""])[0]
        raise FedsimError(
            f"{option}=: cannot be sent to the Ray actors, it does not pickle "
            f"({type(err).__name__}: {reason}); define it at module level, or keep "
            "locks, open files and connections out of it (open them inside the actor, "
            "e.g. lazily in client())") from err

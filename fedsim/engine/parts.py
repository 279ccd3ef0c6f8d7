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
    imported in the server actor, when it is first used); otherwise the one that
    the DP mechanism builds (``mechanism``, a Mechanism object, or the one
    ``cfg.dp.mechanism`` names; ``none`` is the weighted mean).
    """
    if cfg.aggregator.kind == "tff":
        from fedsim.interop.tff import build_tff_aggregator

        return build_tff_aggregator(cfg)
    return resolve_mechanism(mechanism if mechanism is not None
                             else cfg.dp.mechanism).build_aggregator(cfg)


@dataclass(frozen=True)
class Parts:
    """The run's pluggable parts, resolved once in the driver and shipped to the
    actors (they must pickle): the DP mechanism and the server algorithm."""

    mechanism: Any
    algorithm: Any


def check_picklable(option: str, obj: Any) -> None:
    """Refuse (one line, naming ``option``) an object that cannot reach the actors:
    Ray ships it with cloudpickle."""
    from ray import cloudpickle

    try:
        cloudpickle.dumps(obj)
    except Exception as err:  # noqa: BLE001 - whatever pickling raises, say it in one line
        raise FedsimError(f"{option}: the object must pickle to reach the Ray actors "
                          f"({type(obj).__name__} does not: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err

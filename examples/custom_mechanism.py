"""A user's own DP mechanism, plugged into fedsim without editing it.

``NumpyGaussian`` is the Gaussian mechanism written from scratch in numpy: each
client's update is zeroed if non-finite, clipped to L2 norm ``dp.l2_norm_clip``
(C) in the worker actor; the server adds N(0, (z C)^2) per coordinate to the sum
once, from the round's privacy-noise stream, and divides by
``clients_per_round``. Its per-round event is ``GaussianDpEvent(z)``, which the
accountant composes with sampling amplification like any built-in's.

Two files make a mechanism: this one (a :class:`Mechanism` that states its event
and builds its :class:`Aggregator`) and, for Hydra, nothing more than a name::

    PYTHONPATH=. uv run python scripts/simulate.py dp=gaussian \\
        dp.mechanism=examples.custom_mechanism:NumpyGaussian

From Python: ``run_simulation(cfg, mechanism=NumpyGaussian())`` (see :func:`main`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import dp_accounting
import numpy as np

from fedsim.aggregation.base import Aggregator, Partial, clip_measurements, zero_invalid
from fedsim.config import DPConfig, ServerConfig, SimConfig
from fedsim.privacy import noise
from fedsim.privacy.mechanisms.base import Mechanism


class NumpyGaussianAggregator(Aggregator):
    """Clip in the workers, noise once on the server (numpy float64 throughout)."""

    def __init__(self, clip: float, noise_multiplier: float, clients_per_round: int,
                 zeroing_norm: Optional[float]) -> None:
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.clients_per_round = int(clients_per_round)
        self.zeroing_norm = zeroing_norm

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {"clip": self.clip}

    def current_clip(self, state: Mapping[str, Any]) -> float:
        return self.clip

    def zero_stats(self) -> dict[str, float]:
        return {"clipped": 0.0, "zeroed": 0.0}

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        d, norm, zeroed = zero_invalid(delta, self.zeroing_norm)
        clipped = norm > params["clip"]
        if clipped:
            d = d * (params["clip"] / norm)
        return Partial(d, 1.0, 1, {"clipped": float(clipped), "zeroed": float(zeroed)})

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        std = self.noise_multiplier * self.clip
        noised = partial.total + noise.gaussian(rng, partial.total.shape, std)
        event = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return ((noised / self.clients_per_round).astype(np.float32), dict(state),
                clip_measurements(partial, self.clip, std / self.clients_per_round, event))


class NumpyGaussian(Mechanism):
    """The mechanism: its event from the config, and the aggregator that runs it."""

    def round_event(self, dp: DPConfig, clients_per_round: int, *, dim: Optional[int] = None,
                    precision_bits: int = 16, noise_shares: Optional[int] = None
                    ) -> dp_accounting.DpEvent:
        return dp_accounting.GaussianDpEvent(dp.noise_multiplier)

    def build_aggregator(self, cfg: SimConfig) -> Aggregator:
        return NumpyGaussianAggregator(cfg.dp.l2_norm_clip, cfg.dp.noise_multiplier,
                                       cfg.clients_per_round, cfg.dp.zeroing_norm)


def main(rounds: int = 3, actors: Any = None) -> Any:
    """Three rounds on the bundled digits with the user's mechanism, from Python."""
    from fedsim.config import ModelConfig, RayConfig
    from fedsim.simulation import run_simulation

    cfg = SimConfig(clients=30, clients_per_round=10, rounds=rounds, local_epochs=1,
                    model=ModelConfig(name="logreg"), ray=RayConfig(workers=1), progress=False,
                    dp=DPConfig(mechanism="gaussian", noise_multiplier=0.8, l2_norm_clip=1.0),
                    server=ServerConfig(weighting="uniform"))
    result = run_simulation(cfg, mechanism=NumpyGaussian(), actors=actors)
    privacy = result.summary["privacy"]
    print(f"{privacy['mechanism']}: epsilon {privacy['epsilon']:.3f} after {rounds} rounds, "
          f"accuracy {result.summary['final']['eval_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()

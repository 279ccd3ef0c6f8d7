"""``dp=banded_mf``: banded matrix factorization (Choquette-Choo et al.,
"(Amplified) Banded Matrix Factorization", NeurIPS 2023) in its banded Toeplitz
form (McKenna 2024): the ``dp.bands`` coefficients of the strategy are optimized
once for ``rounds`` and the participation scheme, and cached by those parameters
(:func:`fedsim.privacy.matrix_factorization.banded_toeplitz_strategy`). With
``bands <= sampling.min_sep`` a client's rounds touch disjoint bands, so the
sensitivity is that of its columns alone. The server keeps the last
``bands - 1`` noise rows. Accounted as :mod:`fedsim.privacy.correlated` says,
without amplification by sampling."""

from __future__ import annotations

from fedsim.config import SimConfig
from fedsim.privacy import matrix_factorization as mf
from fedsim.privacy.correlated import MatrixFactorizationMechanism, default_cache_dir
from fedsim.privacy.correlated import participation as scheme


class BandedMF(MatrixFactorizationMechanism):
    name = "banded_mf"

    def bands(self, cfg: SimConfig) -> int:
        """``dp.bands``, or by default ``sampling.min_sep`` (min_sep) or the rounds of an
        epoch (epochs), at most ``rounds``."""
        if cfg.dp.bands is not None:
            return min(int(cfg.dp.bands), cfg.rounds)
        p = scheme(cfg)
        return min(int(p.min_sep if p.kind == "min_sep" else p.epoch_rounds or 1), cfg.rounds)

    def strategy(self, cfg: SimConfig) -> mf.Strategy:
        return mf.banded_toeplitz_strategy(cfg.rounds, self.bands(cfg), scheme(cfg),
                                           cache_dir=cfg.dp.strategy_cache or default_cache_dir())

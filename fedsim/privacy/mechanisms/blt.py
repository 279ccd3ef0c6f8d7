"""``dp=blt``: a buffered linear Toeplitz mechanism (Dvijotham et al., "Efficient
and Near-Optimal Noise Generation for Streaming Differential Privacy", FOCS
2024; McKenna 2024): the noise generator ``C^{-1}`` is a BLT of ``dp.buffers``
geometric buffers, optimized once for ``rounds`` and the participation scheme
and cached (:func:`fedsim.privacy.matrix_factorization.blt_strategy`). The
server's noise state is ``buffers`` vectors of the model's size, whatever the
number of rounds. Accounted as :mod:`fedsim.privacy.correlated` says, without
amplification by sampling."""

from __future__ import annotations

from fedsim.config import SimConfig
from fedsim.privacy import matrix_factorization as mf
from fedsim.privacy.correlated import MatrixFactorizationMechanism, default_cache_dir
from fedsim.privacy.correlated import participation as scheme


class BLT(MatrixFactorizationMechanism):
    name = "blt"

    def strategy(self, cfg: SimConfig) -> mf.Strategy:
        return mf.blt_strategy(cfg.rounds, cfg.dp.buffers, scheme(cfg),
                               cache_dir=cfg.dp.strategy_cache or default_cache_dir())

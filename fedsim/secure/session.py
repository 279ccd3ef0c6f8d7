"""One round of secure aggregation, both sides: what the server actor and the
worker actors (on behalf of their clients) do in each of the protocol's message
rounds. The actors' ``secagg_*`` methods are thin wrappers around these, and
:func:`fedsim.engine.rounds.secure_round` routes the messages between them.

Message rounds: 0 advertise keys, 1 share keys, 2 masked input, 3 unmask. Every
sampled client joins the key exchange; only the reporting ones mask, the
others drop out before masking. Keys are drawn from the run's seed so that
simulations are reproducible (a deployment would use the OS's RNG).
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from fedsim.config import SecAggConfig
from fedsim.secure.layout import SecureLayout, make_layout


class ServerSession:
    """The server's side of one round's protocol over the workers' shards.

    ``layout``: the fixed-point layout of the clients' records; ``shards``: each
    worker's clients (some may be empty). With ``secagg.skip_cancelling_masks``
    the shards follow the SecAgg+ graph's ring
    (:meth:`fedsim.secure.protocol.SecAggServer.placement`), so that more of the
    pairwise masks cancel inside one worker's sum.
    """

    def __init__(self, sa: SecAggConfig, sampled: Sequence[int], workers: int, clip: float,
                 sizes: Sequence[int], update_codec: Any, graph_seed: int) -> None:
        from fedsim.secure.protocol import SecAggServer

        t0 = time.perf_counter()
        self.cfg = sa
        n = max(len(sampled), 1)
        self.layout: SecureLayout = make_layout(sa, clip, sizes, n, update_codec)
        self.protocol = SecAggServer(self.layout.bits, self.layout.vector_len, sa.protocol,
                                     threshold=sa.threshold, graph_seed=graph_seed,
                                     neighbours=sa.neighbours)
        if sa.skip_cancelling_masks:
            self.shards = self.protocol.placement(sampled, workers)
        else:
            self.shards = [part.tolist() for part in
                           np.array_split(np.sort(np.asarray(sampled)), workers)]
        active = [shard for shard in self.shards if shard]  # the workers that take part
        self._owner = {int(c): i for i, shard in enumerate(active) for c in shard}
        self._workers = len(active)
        self.dropped: set[int] = set()
        self._abort: Optional[Exception] = None
        self.seconds = time.perf_counter() - t0

    def _route(self, by_client: Mapping[int, Any]) -> list[dict[int, Any]]:
        """Split messages addressed to clients into one dict per worker."""
        out: list[dict[int, Any]] = [{} for _ in range(self._workers)]
        for cid, msg in by_client.items():
            out[self._owner[cid]][cid] = msg
        return out

    def keys(self, adverts: Iterable[list]) -> list[dict[int, Any]]:
        """Round 0: collect the public keys; each client's neighbours' keys, per worker."""
        t0 = time.perf_counter()
        out = self._route(self.protocol.receive_keys(itertools.chain(*adverts)))
        self.seconds += time.perf_counter() - t0
        return out

    def route(self, shares: Iterable[list]) -> list[dict[int, Any]]:
        """Round 1: route the encrypted shares to their receivers, per worker."""
        t0 = time.perf_counter()
        out = self._route(self.protocol.route_shares(itertools.chain(*shares)))
        self.seconds += time.perf_counter() - t0
        return out

    def collect(self, masked: Iterable[Any], dropout_rng: np.random.Generator
                ) -> list[dict[int, Any]]:
        """Round 2: collect the masked inputs; the unmask requests to the clients
        still online, per worker. Simulated dropouts: each client goes silent
        after masking with probability ``secagg.dropout`` (``dropout_rng``)."""
        from fedsim.secure.protocol import SecAggAbort

        t0 = time.perf_counter()
        try:
            requests = self.protocol.collect_masked(masked)
        except SecAggAbort as err:  # too many dropped before masking: nothing to unmask
            self._abort = err
            requests = {}
        self.dropped = {c for c in sorted(requests) if dropout_rng.random() < self.cfg.dropout}
        out = self._route({c: r for c, r in requests.items() if c not in self.dropped})
        self.seconds += time.perf_counter() - t0
        return out

    def unmask(self, responses: Sequence[tuple[list, float]]
               ) -> tuple[Optional[np.ndarray], dict[str, Any], Optional[Exception]]:
        """Round 3: the unmasked integer sum (or None and the reason if the
        protocol aborted: too few shares arrived), and the round's measurements.
        ``responses``: each worker's (unmask responses, seconds it spent on the
        protocol); ``secagg_seconds`` is the slowest worker's plus the server's."""
        from fedsim.secure.protocol import SecAggAbort

        t0 = time.perf_counter()
        base: dict[str, Any] = {"secagg_dropped": len(self.dropped),
                                "secagg_bits": self.layout.bits,
                                "secagg_neighbours": self.protocol.neighbourhood_size}
        total, aborted = None, self._abort
        if aborted is None:
            try:
                total = self.protocol.unmask(itertools.chain(*(r for r, _ in responses)))
            except SecAggAbort as err:
                aborted = err
        base["secagg_seconds"] = (self.seconds + time.perf_counter() - t0
                                  + max((s for _, s in responses), default=0.0))
        return total, base, aborted

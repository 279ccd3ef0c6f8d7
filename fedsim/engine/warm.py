"""Warm actors: the server and worker actors kept alive across simulations.

Starting an actor costs a new Python process, a TensorFlow import and a Keras
model build. :class:`WarmActors` keeps the actors that
:func:`fedsim.simulation.run_simulation` used alive in the running Ray session
and hands them to the next run, which re-initialises them with
:meth:`fedsim.engine.server.Server.reset` and
:meth:`fedsim.engine.worker.ClientWorker.reset` (afterwards an actor is in the
state a freshly constructed one is in) instead of starting new processes::

    with WarmActors() as actors:
        for seed in range(5):
            run_simulation(dataclasses.replace(cfg, seed=seed), actors=actors)

The cache is an ordinary object that its caller holds and passes; fedsim keeps
no global state. One run at a time may use it.

What a reset cannot change keys the cache: an actor's Ray resources (CPUs and
GPUs; the CPUs also size TensorFlow's thread pools, once per process) and its
placement. The worker actors live in a placement group that the cache reserves
as :func:`fedsim.engine.worker.make_pool` does for a fresh run (one bundle of
``ray.cpus_per_worker`` CPUs and ``ray.gpus_per_worker`` GPUs per worker,
SPREAD over the nodes), or, when the run executes inside a placement group its
caller holds (e.g. the Hydra Ray launcher's), in that one. A run that needs
``n`` workers takes the first ``n`` of the cached pool when the pool has the
same bundle and placement and at least ``n`` workers; otherwise the cached pool
is stopped (its reservation would stand in the new one's way) and a pool of
``n`` is started and cached. The cached pool's reservation keeps its CPUs and
GPUs from everyone else until :meth:`WarmActors.close`.

Faults: a worker that died during a run and that the run restarted in its
bundle is replaced in the cache by the restart; an actor found dead when a run
starts is started afresh. A run that ends with an error hands its server and
workers back as failed: they are killed and dropped, so that nothing a failed
run left behind (a half-finished round, a call still running) reaches a later
run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence

from fedsim.config import SimConfig
from fedsim.engine.server import SERVER_RAY_CPUS, SERVER_TF_CPUS, start_server
from fedsim.engine.worker import WorkerPool, make_pool, make_worker, worker_bundle


@dataclass
class _Slot:
    """A cached actor (the server) or pool of actors (the workers), and its key."""

    key: Hashable
    value: Any


@dataclass
class WarmActors:
    """Server and worker actors kept alive across ``run_simulation`` calls.

    Pass it as ``run_simulation(cfg, actors=...)``. :meth:`close` (or leaving a
    ``with`` block) stops every actor it holds and removes the placement group
    it reserved. It holds the actors of one Ray session: after ``ray.shutdown``
    and a new ``ray.init`` the next run finds it empty.
    """

    _server: Optional[_Slot] = None  # value: the server actor handle
    _pool: Optional[_Slot] = None  # value: a WorkerPool, worker i in bundle i
    _session: Optional[tuple] = None  # (driver's node id, job id) the actors belong to
    _busy: bool = field(default=False, repr=False)  # a run holds the actors now

    def acquire(self, cfg: SimConfig, parts: Any, data_ref: Any, input_shape: Sequence[int],
                num_classes: int, x_test: Any, y_test: Any,
                num_workers: int) -> tuple[Any, WorkerPool]:
        """The server actor and a pool of ``num_workers`` worker actors for a run of
        ``cfg``: cached ones reset, missing ones started, all with the arguments
        a fresh run constructs them with (``data_ref``: the object ref of the
        clients' training data; ``x_test``, ``y_test``: the central test split,
        arrays or their object refs; worker ``i`` gets index ``i``).

        Returns once all of them are ready; a reset's or constructor's error is
        raised here (what was taken is then stopped). Hand them back with
        :meth:`release` when the run ends, also when it fails.
        """
        import ray

        if self._busy:
            raise RuntimeError("WarmActors: another run holds these actors (one run at a time)")
        self._forget_other_sessions()
        self._busy = True
        server = pool = None
        shape = tuple(input_shape)
        try:
            pool, fresh_pool = self._take_pool(cfg, parts, data_ref, shape, num_classes,
                                               num_workers)
            worker_ready = [w.ping.remote() if fresh_pool else
                            w.reset.remote(cfg, parts, data_ref, shape, num_classes,
                                           cfg.ray.cpus_per_worker, i)
                            for i, w in enumerate(pool.actors)]
            server, fresh_server = self._take_server()
            dead = []
            for i, ref in enumerate(worker_ready):
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    if fresh_pool:
                        raise
                    pool.actors[i] = make_worker(cfg, parts, data_ref, shape, num_classes, i, pool)
                    dead.append(i)
            ray.get([pool.actors[i].ping.remote() for i in dead])
            # w_0 from a worker (the server's process needs no TensorFlow of its own)
            initial = pool.actors[0].initial_weights.remote()
            if fresh_server:
                server = start_server(cfg, parts, shape, num_classes, x_test, y_test, initial)
                server_ready = server.num_parameters.remote()
            else:
                server_ready = server.reset.remote(cfg, parts, shape, num_classes, x_test, y_test,
                                                   SERVER_TF_CPUS, initial)
            try:
                ray.get(server_ready)
            except ray.exceptions.RayActorError:  # it died since the last run
                if fresh_server:
                    raise
                _kill(server)
                server = start_server(cfg, parts, shape, num_classes, x_test, y_test, initial)
                ray.get(server.num_parameters.remote())
        except BaseException:
            self._busy = False
            self._drop(server, pool)
            raise
        return server, pool

    def release(self, server: Any, pool: Optional[WorkerPool], failed: bool = False) -> None:
        """Take back what :meth:`acquire` handed out, as the run left it:
        ``pool.actors`` with restarted workers in place of those that died.

        ``failed``: the run ended with an error; its server and workers are then
        killed and dropped instead of kept.
        """
        self._busy = False
        if failed:
            self._drop(server, pool)
            return
        if server is not None and self._server is not None and self._server.value is None:
            self._server.value = server
        if pool is not None and self._pool is not None:
            cached: WorkerPool = self._pool.value
            if cached.placement_group is pool.placement_group:
                cached.actors[:len(pool.actors)] = pool.actors

    def close(self) -> None:
        """Stop every cached actor and remove the placement group the cache reserved."""
        import ray

        server, pool = self._server, self._pool
        self._server = self._pool = None
        if not ray.is_initialized() or self._session != _session():
            return  # the session that ran them is gone, and they with it
        if server is not None and server.value is not None:
            _kill(server.value)
        if pool is not None:
            _stop_pool(pool.value)

    def handles(self) -> list:
        """The cached actors' handles: the server's (if cached), then the workers'
        in bundle order. Equal handles name the same actor (process)."""
        server = ([self._server.value] if self._server is not None
                  and self._server.value is not None else [])
        return server + (list(self._pool.value.actors) if self._pool is not None else [])

    def __len__(self) -> int:
        """The number of actors cached (the server and the workers)."""
        return len(self.handles())

    def __enter__(self) -> "WarmActors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _forget_other_sessions(self) -> None:
        now = _session()
        if now != self._session:  # a new Ray session: the cached handles are dead
            self._server = self._pool = None
            self._session = now

    def _take_server(self) -> tuple[Any, bool]:
        """The cached server (taken out: its slot holds None while a run has it), and
        whether there was none (the caller then starts one)."""
        key = ("server", SERVER_RAY_CPUS, 0.0, SERVER_TF_CPUS, _outer_placement_group())
        slot = self._server
        if slot is not None and slot.key == key and slot.value is not None:
            server, slot.value = slot.value, None
            return server, False
        if self._server is not None and self._server.value is not None:
            _kill(self._server.value)  # placed elsewhere: of no more use
        self._server = _Slot(key, None)
        return None, True

    def _take_pool(self, cfg: SimConfig, parts: Any, data_ref: Any, shape: tuple,
                   num_classes: int, size: int) -> tuple[WorkerPool, bool]:
        """The first ``size`` workers of the cached pool when it fits, else a newly
        started (and cached) pool of ``size``; and whether it is new."""
        key = (tuple(sorted(worker_bundle(cfg).items())), _outer_placement_group())
        if self._pool is not None and self._pool.key == key and len(
                self._pool.value.actors) >= size:
            cached: WorkerPool = self._pool.value
            return WorkerPool(cached.actors[:size], cached.placement_group), False
        if self._pool is not None:  # its reservation would block the new one
            stale, self._pool = self._pool.value, None
            _stop_pool(stale)
        fresh = make_pool(cfg, parts, data_ref, shape, num_classes, size)
        self._pool = _Slot(key, WorkerPool(list(fresh.actors), fresh.placement_group))
        return fresh, True

    def _drop(self, server: Any, pool: Optional[WorkerPool]) -> None:
        """Kill ``server`` and the whole cached pool that ``pool`` came from."""
        if server is not None:
            _kill(server)
        if self._server is not None and self._server.value in (None, server):
            self._server = None
        if pool is None:
            return
        for a in pool.actors:  # (restarts included, which the cache never saw)
            _kill(a)
        if self._pool is not None and self._pool.value.placement_group is pool.placement_group:
            stale, self._pool = self._pool.value, None
            _stop_pool(stale)


def _session() -> tuple:
    """Identifies the Ray session this driver is connected to."""
    import ray

    ctx = ray.get_runtime_context()
    return (ctx.get_node_id(), ctx.get_job_id())


def _outer_placement_group() -> Optional[str]:
    """The id of the placement group this code runs in (None: none)."""
    from ray.util.placement_group import get_current_placement_group

    pg = get_current_placement_group()
    return None if pg is None else pg.id.hex()


def _kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _stop_pool(pool: WorkerPool) -> None:
    """Kill the pool's actors and remove its placement group."""
    import ray

    for a in pool.actors:
        _kill(a)
    if pool.placement_group is not None:
        try:
            ray.util.remove_placement_group(pool.placement_group)
        except Exception:  # noqa: BLE001 - already removed
            pass

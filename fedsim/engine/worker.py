"""Client worker actors: each one simulates many virtual clients.

A fixed pool of :class:`ClientWorker` actors (never one actor per client) is
created once. Each worker builds its Keras model (from the run's
:class:`fedsim.models.spec.ModelSpec`) once, gets its shard of the
round's cohort plus ONE object-store reference to the global weights per round,
trains its clients one after another with :class:`fedsim.client.local.LocalTrainer`,
and folds each update into a partial sum with the aggregator's ``accumulate``
(clipping happens there, in the worker). It returns that single
:class:`fedsim.aggregation.base.Partial` plus training statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from fedsim.aggregation.base import Partial, merge_partials
from fedsim.algorithms.base import ClientOutput, ClientSums, add_sums
from fedsim.config import SimConfig
from fedsim.data.base import ClientData
from fedsim.errors import FedsimError
from fedsim.results.outputs import memory_mib
from fedsim.rng import STREAM_NOISE, STREAM_PERSONALIZE, STREAM_SECAGG, STREAM_SHUFFLE, stream


@dataclass(frozen=True)
class WorkerReport:
    """What a worker sends back for one round.

    partial: the aggregator's partial sum over this worker's clients.
    loss_sum: sum over clients of (mean training loss * num_examples).
    num_examples: examples trained on (each counted once, not per epoch).
    num_clients: clients trained.
    masked: with secure aggregation, one ``fedsim.secure.protocol.MaskedSum`` of this
      worker's clients' masked inputs; ``partial`` then carries only the
      plaintext counts and statistics (its ``total`` is empty).
    sums: the algorithm's additive per-client vectors, summed over this
      worker's clients (:data:`fedsim.algorithms.base.ClientSums`).
    state_file: a stateful algorithm's staged client states of this round
      (:meth:`fedsim.client.state.ClientStateStore.stage`), or None.
    """

    partial: Partial
    loss_sum: float
    num_examples: int
    num_clients: int
    masked: tuple = ()
    sums: Mapping[str, tuple[np.ndarray, float]] = dataclasses.field(default_factory=dict)
    state_file: Optional[str] = None


_SKIPPED_WITH_TENSORFLOW = ("jax", "pandas")
"""Optional imports of ``import tensorflow`` that fedsim never uses: TF Lite's
JAX converter (``tensorflow.lite.python.util`` tries ``from jax import
xla_computation``; JAX is installed because TFF needs it) and Keras's pandas
inputs (``keras.src.engine.data_adapter`` tries ``import pandas``). Each costs
an actor's start a second or more of CPU."""


def import_tensorflow() -> Any:
    """``import tensorflow``, without the optional imports that come with it
    (:data:`_SKIPPED_WITH_TENSORFLOW`).

    While TensorFlow is first imported, those modules are marked absent, so
    its ``try: import ...`` fails and TF Lite's JAX converter and Keras's
    pandas support go without; afterwards they are importable as usual (a
    user's model, TFF). A module this process has imported already is left as
    it is, and so is a process that has imported TensorFlow."""
    import sys

    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    skipped = [m for m in _SKIPPED_WITH_TENSORFLOW if m not in sys.modules]
    for m in skipped:
        sys.modules[m] = None  # type: ignore[assignment]  # import m: ImportError
    try:
        import tensorflow as tf
    finally:
        for m in skipped:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    return tf


def configure_tensorflow(num_cpus: float) -> None:
    """Size TF's thread pools to the CPUs Ray gives this process, and let it
    share GPUs (memory growth), before TF runs any op (and import TensorFlow:
    :func:`import_tensorflow`)."""
    tf = import_tensorflow()

    threads = max(1, int(num_cpus))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # TF already initialised in this process (e.g. a test)
        pass


def reinit_process(actor: Any, num_cpus: float) -> None:
    """Before an actor re-initialises in its own process: check that its TensorFlow
    thread pools fit ``num_cpus``, close what its last run holds outside Python
    (``actor.close()``, if it has one), forget every attribute, and clear Keras's
    global state (layer-name counters, graphs), so that the process looks to the
    new run as a fresh one does."""
    if actor.__dict__.get("_num_cpus") != num_cpus:
        raise ValueError(f"reset with num_cpus={num_cpus}: this process's TensorFlow thread "
                         f"pools are sized for {actor.__dict__.get('_num_cpus')}")
    close = getattr(actor, "close", None)
    if close is not None:
        try:
            close()
        except AttributeError:  # the last (re)initialisation failed before its parts existed
            pass
    actor.__dict__.clear()
    import sys

    if "tensorflow" in sys.modules:  # (a server without TF-using parts never imports it)
        import tensorflow as tf

        tf.keras.backend.clear_session()


class ClientWorker:
    """Simulates virtual clients; plain Python, wrapped by Ray in :func:`make_pool`."""

    def __init__(self, cfg: SimConfig, parts: Any, client_data: ClientData,
                 input_shape: Sequence[int], num_classes: int, num_cpus: float = 1.0,
                 index: int = 0) -> None:
        self.reset(cfg, parts, client_data, input_shape, num_classes, num_cpus, index)

    def reset(self, cfg: SimConfig, parts: Any, client_data: ClientData,
              input_shape: Sequence[int], num_classes: int, num_cpus: float = 1.0,
              index: int = 0) -> None:
        """(Re)initialise for a run of ``cfg``: afterwards this worker is in the state
        ``ClientWorker(<the same arguments>)`` starts in (nothing of an earlier
        run is left; Keras's session is cleared).

        parts: the run's model the clients train (and its loss) and DP mechanism
        (:class:`fedsim.engine.parts.Parts`); client_data: every client's examples
        (``client(cid) -> (x, y)``). ``num_cpus`` sizes TensorFlow's thread pools,
        which a process sizes once: a reset must pass the value the worker was
        constructed with (:class:`fedsim.engine.warm.WarmActors` keys its actors
        by it)."""
        if self.__dict__:  # a re-initialisation
            reinit_process(self, num_cpus)
        self._num_cpus = num_cpus
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        configure_tensorflow(num_cpus)
        from fedsim.engine.parts import build_aggregator

        self.cfg = cfg
        self.data = client_data
        self.aggregator = build_aggregator(cfg, parts.mechanism)
        model_spec = parts.model
        args = (model_spec, cfg.client, input_shape, num_classes, cfg.batch_size,
                cfg.local_epochs)
        self.trainer: Any  # LocalTrainer, VectorizedTrainer (train_many) or DPSGDTrainer
        if cfg.client.optimizer == "dp_sgd":
            from fedsim.client.dp_sgd import DPSGDTrainer

            self.trainer = DPSGDTrainer(*args, seed=cfg.seed)
        elif cfg.client.per_call > 1:
            from fedsim.client.vectorized import VectorizedTrainer

            self.trainer = VectorizedTrainer(*args, seed=cfg.seed,
                                             max_clients_per_call=cfg.client.per_call)
        else:
            from fedsim.client.local import LocalTrainer

            self.trainer = LocalTrainer(*args, seed=cfg.seed)
        self._model_args = (model_spec, tuple(input_shape), int(num_classes))
        self.algorithm = parts.algorithm
        self._state_fields = self.algorithm.client_state_fields(self.trainer.num_parameters)
        self._store: Any = None  # the ClientStateStore, opened on first use
        self._evaluator: Any = None  # a ClientEvaluator, built on first use
        self._secagg_states: dict[int, Any] = {}
        self._secagg_input: Any = None  # (report, client ids, bits, encoded sum) of train_round
        self._secagg_seconds = 0.0  # spent on this round's protocol steps so far
        self.index = index

    def train_round(self, round_num: int, weights: np.ndarray, params: Mapping[str, Any],
                    client_ids: Sequence[int], secure: Any = None,
                    attempt: int = 0) -> WorkerReport | None:
        """Train ``client_ids`` from ``weights`` and return their partial sum.

        Client ``c`` shuffles with the stream ``(seed, SHUFFLE, round, c)``, so its
        update does not depend on which worker trains it. With ``secure`` (the
        round's :class:`fedsim.secure.layout.SecureLayout`) each client's
        record is fixed-point encoded into a running sum instead, and the
        report comes from :meth:`secagg_mask` (so that training need not wait
        for the protocol's share routing); this returns None.
        """
        if (self.cfg.faults.crash_worker_at_round == round_num and attempt == 0
                and self.index == 0):
            os._exit(1)  # injected fault: this worker process dies mid-round
        size = self.trainer.num_parameters
        # Secure aggregation: only counts and statistics are summed in the clear;
        # the clients' encoded records are summed as they come.
        partial = (self.aggregator.zero_partial(size) if secure is None
                   else Partial(np.zeros(0), 0.0, 0))
        running = self.aggregator.running(params, partial) if secure is None else None
        encoded: Any = None  # the sum of the clients' encoded records
        if secure is not None:
            encoded = np.zeros(secure.vector_len, secure.word_dtype)
        loss_sum, examples, encode_seconds = 0.0, 0, 0.0
        sums: ClientSums = {}
        new_states: dict[int, Mapping[str, np.ndarray]] = {}
        payload = params.get("algorithm", {})  # the algorithm's, e.g. proximal_mu
        for cid, output in self._train_clients(round_num, weights, client_ids, payload):
            result = output.result
            loss_sum += result.loss * result.num_examples
            examples += result.num_examples
            if output.sums:
                if secure is not None:
                    raise FedsimError(f"algorithm {self.algorithm.name}: its clients send "
                                      "sums besides the update, which secure aggregation "
                                      "does not carry")
                sums = add_sums(sums, output.sums)
            if output.state is not None:
                new_states[cid] = output.state
            if running is not None:
                running.add(result.delta, result.num_examples)
                continue
            one = self.aggregator.record(params, result.delta, result.num_examples)
            t0 = time.perf_counter()
            # rounding and (Skellam) noise shares: a privacy-noise stream
            rng = stream(self.cfg.noise_root(), STREAM_SECAGG, round_num, cid)
            secure.encode([one.total, *one.extras], rng, add_to=encoded)
            encode_seconds += time.perf_counter() - t0
            partial = merge_partials(partial, Partial(np.zeros(0), one.weight, one.count,
                                                      one.stats))
        if running is not None:
            partial = running.partial()
        state_file = (self._client_store().stage(round_num, self.index, attempt, new_states)
                      if new_states else None)
        report = WorkerReport(partial, loss_sum, examples, len(client_ids), sums=sums,
                              state_file=state_file)
        if secure is None:
            return report
        self._secagg_input = (report, [int(c) for c in client_ids], secure.bits, encoded)
        self._secagg_seconds += encode_seconds
        return None

    def _client_store(self) -> Any:
        """The run's client-state store (created by the driver before round 1)."""
        if self._store is None:
            from fedsim.client.state import ClientStateStore

            root = self.cfg.algorithm.state_dir
            assert root is not None, "the driver resolves algorithm.state_dir"
            self._store = ClientStateStore(root)
        return self._store

    def _client_state(self, cid: int) -> Mapping[str, np.ndarray]:
        return self._client_store().read(cid) if self._state_fields else {}

    def _train_clients(self, round_num: int, weights: np.ndarray, client_ids: Sequence[int],
                       payload: Mapping[str, Any] | None = None) -> Iterator[tuple[int, Any]]:
        """``(client id, ClientOutput)`` for each client, in order: the algorithm's
        client side (:meth:`fedsim.algorithms.base.Algorithm.client_update`) around
        the trainer, with the client's stored state. Client ``c`` shuffles with
        the stream ``(seed, SHUFFLE, round, c)``. Vectorized, the shard is trained
        in chunks of ``client.vectorize`` clients per call."""
        def rng(cid: int) -> np.random.Generator:
            return stream(self.cfg.seed, STREAM_SHUFFLE, round_num, cid)

        ids = [int(c) for c in client_ids]
        payload = payload or {}
        if self.cfg.client.per_call > 1:  # (SimConfig allows it with sgd only)
            # Chunks bound the memory of the clients' data held at once. (Only
            # algorithms without a client side of their own run vectorized.)
            step = self.cfg.client.per_call * 4
            for s in range(0, len(ids), step):
                chunk = ids[s:s + step]
                results = self.trainer.train_many(
                    weights, [(*self.data.client(c), rng(c)) for c in chunk])
                yield from ((c, ClientOutput(r)) for c, r in zip(chunk, results))
            return
        dp_sgd = self.cfg.client.optimizer == "dp_sgd"
        for cid in ids:
            x, y = self.data.client(cid)
            fixed: dict[str, Any] = {}
            if dp_sgd:  # DP-SGD's noise and batches
                fixed["noise_rng"] = stream(self.cfg.noise_root(), STREAM_NOISE, round_num, cid)
            train = functools.partial(self.trainer.train, weights, x, y, rng(cid), **fixed)
            yield cid, self.algorithm.client_update(train, payload, self._client_state(cid))

    def _client_evaluator(self) -> Any:
        """The worker's :class:`fedsim.client.evaluation.ClientEvaluator` (built on
        first use: federated evaluation's batch size and personalization's)."""
        if self._evaluator is None:
            from fedsim.client.evaluation import ClientEvaluator

            fe = self.cfg.federated_eval
            spec, input_shape, num_classes = self._model_args
            lr = (fe.personalization_lr if fe.personalization_lr is not None
                  else self.cfg.client.learning_rate)
            self._evaluator = ClientEvaluator(spec, input_shape, num_classes, self.cfg.seed,
                                              fe.batch_size, self.cfg.batch_size, lr)
        return self._evaluator

    def initial_weights(self) -> np.ndarray:
        """``w_0``: the run's model as ``cfg.seed`` builds it, as one flat float32
        vector (:meth:`fedsim.models.spec.ModelSpec.initial_weights`); the server
        starts from it, so that the server's process needs no TensorFlow."""
        spec, input_shape, num_classes = self._model_args
        return spec.initial_weights(input_shape, num_classes, self.cfg.seed)

    def evaluate_central(self, weights: np.ndarray, x: np.ndarray, y: np.ndarray
                         ) -> dict[str, Optional[float]]:
        """The model with ``weights`` on the centralized test split ``x, y``
        (:func:`fedsim.client.evaluation.central_metrics`), for the server, whose
        process has no model."""
        from fedsim.client.evaluation import CENTRAL_EVAL_BATCH, central_metrics

        return central_metrics(self._client_evaluator().evaluate(weights, -1, x, y,
                                                                 CENTRAL_EVAL_BATCH))

    def evaluate_clients(self, round_num: int, weights: np.ndarray,
                         client_ids: Sequence[int]) -> tuple[list, list]:
        """Federated evaluation of ``weights`` on ``client_ids``' own test data
        (``client_test``): one :class:`fedsim.client.evaluation.ClientEval` each,
        and, with ``federated_eval.personalization_steps`` > 0, one each after
        that many SGD steps on the client's training data (shuffled with the
        stream ``(seed, PERSONALIZE, round, c)``); otherwise the second list is
        empty."""
        fe = self.cfg.federated_eval
        evaluator = self._client_evaluator()
        plain, personalized = [], []
        for cid in (int(c) for c in client_ids):
            x, y = self.data.client_test(cid)  # type: ignore[attr-defined]
            plain.append(evaluator.evaluate(weights, cid, x, y))
            if fe.personalization_steps > 0:
                if len(x):
                    xt, yt = self.data.client(cid)
                    personalized.append(evaluator.personalize(
                        weights, cid, xt, yt, x, y, fe.personalization_steps,
                        stream(self.cfg.seed, STREAM_PERSONALIZE, round_num, cid)))
                else:
                    personalized.append(plain[-1])
        return plain, personalized

    # -- secure aggregation, on behalf of this worker's clients of the round -------
    def secagg_advertise(self, round_num: int, client_ids: Sequence[int]) -> list:
        """Round 0: the clients' key pairs; returns their AdvertiseKeys messages.

        Keys are drawn from the run's seed (stream ``(seed, SECAGG, round)``) so
        simulations are reproducible; a deployment would use the OS's RNG.
        """
        from fedsim.secure.protocol import clients_advertise

        t0 = time.perf_counter()
        key_seed = int(stream(self.cfg.seed, STREAM_SECAGG, round_num).integers(2**62))
        self._secagg_states, msgs = clients_advertise([int(c) for c in client_ids], key_seed)
        self._secagg_seconds = time.perf_counter() - t0
        return msgs

    def secagg_share_keys(self, setups: Mapping[int, Any]) -> list:
        """Round 1: encrypted Shamir shares of each client's secrets for its neighbours
        (with ``secagg.skip_cancelling_masks=false`` each client derives every one
        of its share keys itself, as it derives all of its masks)."""
        from fedsim.secure.protocol import clients_share_keys

        t0 = time.perf_counter()
        out = clients_share_keys(self._secagg_states, setups,
                                 share_pair_keys=self.cfg.secagg.skip_cancelling_masks)
        self._secagg_seconds += time.perf_counter() - t0
        return out

    def secagg_mask(self, deliveries: Mapping[int, Any]) -> WorkerReport:
        """Round 2, after :meth:`train_round` with a layout: the clients' masked
        inputs, summed into one ``MaskedSum``, in the round's report.

        With ``secagg.skip_cancelling_masks`` the pairwise masks between this
        worker's own clients, which cancel in the sum, are skipped; otherwise
        every client computes all of its masks
        (:func:`fedsim.secure.protocol.clients_mask_sum`, ``skip_cancelling``)."""
        from fedsim.secure.protocol import clients_mask_sum

        t0 = time.perf_counter()
        report, ids, _, encoded = self._secagg_input
        self._secagg_input = None
        masked = clients_mask_sum(self._secagg_states, deliveries, ids, encoded,
                                  skip_cancelling=self.cfg.secagg.skip_cancelling_masks)
        self._secagg_seconds += time.perf_counter() - t0
        return dataclasses.replace(report, masked=(masked,))

    def secagg_unmask(self, requests: Mapping[int, Any]) -> tuple[list, float]:
        """Round 3: the shares the server asks for (the clients' states are then
        dropped), and the seconds this worker spent on the round's protocol."""
        from fedsim.secure.protocol import clients_unmask

        t0 = time.perf_counter()
        responses = clients_unmask(self._secagg_states, requests)
        self._secagg_states = {}
        seconds = self._secagg_seconds + time.perf_counter() - t0
        self._secagg_seconds = 0.0
        return responses, seconds

    def close(self) -> None:
        """Close the client-state store's files (before a re-initialisation)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def ping(self) -> bool:
        return True

    def where(self) -> dict[str, str]:
        """The Ray node this worker runs on, and where its fedsim code came from
        (on a cluster: the working_dir that Ray shipped)."""
        import ray

        import fedsim

        return {"node": ray.get_runtime_context().get_node_id(),
                "code": os.path.dirname(os.path.abspath(fedsim.__file__))}

    def memory(self) -> dict[str, float]:
        return memory_mib()


def pool_size(cfg: SimConfig, cluster_cpus: float, cluster_gpus: float = 0.0) -> int:
    """Workers to start: ``ray.workers``, or (``auto``) as many as the cluster's CPUs
    (and GPUs, when each worker asks for some) hold, at least 1."""
    if cfg.ray.workers != "auto":
        return int(cfg.ray.workers)
    fit = cluster_cpus // cfg.ray.cpus_per_worker
    if cfg.ray.gpus_per_worker > 0:
        fit = min(fit, cluster_gpus // cfg.ray.gpus_per_worker)
    return max(1, int(fit))


def worker_bundle(cfg: SimConfig) -> dict[str, float]:
    """The Ray resources of one worker actor (one placement-group bundle)."""
    bundle = {"CPU": float(cfg.ray.cpus_per_worker)}
    if cfg.ray.gpus_per_worker > 0:
        bundle["GPU"] = float(cfg.ray.gpus_per_worker)
    return bundle


@dataclass
class WorkerPool:
    """The worker actors and where they are scheduled.

    placement_group: the SPREAD placement group reserved for the pool (one
    bundle per worker, so a restarted worker gets its bundle back), or None when
    the pool lives inside a placement group that the caller already holds (e.g.
    the Hydra Ray launcher's), whose bundles the actors then use.
    """

    actors: list
    placement_group: Any = None


def _strategy(pool: WorkerPool, index: int) -> Any:
    if pool.placement_group is None:
        return None
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pool.placement_group,
                                            placement_group_bundle_index=index)


def make_worker(cfg: SimConfig, parts: Any, data_ref: Any,
                input_shape: Sequence[int], num_classes: int, index: int,
                pool: WorkerPool | None = None) -> Any:
    """Start worker actor ``index`` with the configured CPU/GPU resources (in its
    bundle of ``pool``'s placement group, if it has one)."""
    import ray

    options: dict[str, Any] = {"num_cpus": cfg.ray.cpus_per_worker,
                               "num_gpus": cfg.ray.gpus_per_worker}
    strategy = _strategy(pool, index) if pool is not None else None
    if strategy is not None:
        options["scheduling_strategy"] = strategy
    actor_cls = ray.remote(ClientWorker).options(**options)
    return actor_cls.remote(cfg, parts, data_ref, tuple(input_shape), num_classes,
                            cfg.ray.cpus_per_worker, index)


def make_pool(cfg: SimConfig, parts: Any, data_ref: Any,
              input_shape: Sequence[int], num_classes: int, size: int,
              timeout_s: float = 300.0) -> WorkerPool:
    """Start ``size`` worker actors, spread over the cluster's nodes.

    Reserves a placement group of ``size`` bundles with the SPREAD strategy
    (workers on as many nodes as possible) and waits up to ``timeout_s`` for it;
    if the cluster cannot hold it, raises FedsimError naming ``ray.workers``.
    """
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group


    pool = WorkerPool([])
    if get_current_placement_group() is None:
        pg = placement_group([worker_bundle(cfg)] * size, strategy="SPREAD")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)
            raise FedsimError(
                f"ray.workers={cfg.ray.workers}: the cluster cannot hold {size} workers of "
                f"{worker_bundle(cfg)} each (resources: {ray.cluster_resources()}); lower "
                "ray.workers or the per-worker resources") from None
        pool.placement_group = pg
    pool.actors = [make_worker(cfg, parts, data_ref, input_shape, num_classes, i, pool)
                   for i in range(size)]
    return pool

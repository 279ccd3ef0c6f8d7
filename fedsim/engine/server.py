"""The server: global model, server optimizer, aggregator state, cohort sampling.

:class:`Server` is plain Python (usable without Ray); the simulation runs it as
a Ray actor. Per round it:

1. samples the cohort (:class:`fedsim.cohort.sampling.CohortSampler`, seeded per round);
2. hands out the global weights (one flat float32 vector) and the aggregator's
   client parameters (e.g. the clip norm);
3. merges the workers' partial sums, lets the aggregator finalize them (noise is
   added there, once), and applies the server optimizer to the result;
4. evaluates the global model on the centralized test split when asked: the
   mean per example of the model spec's loss and metrics
   (:class:`fedsim.models.spec.ModelSpec`).
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fedsim.aggregation.base import Partial, merge_partials
from fedsim.algorithms.base import add_sums
from fedsim.cohort.faults import RoundPlan, plan_round, sample_size
from fedsim.cohort.sampling import CohortSampler
from fedsim.config import SimConfig
from fedsim.engine.parts import Parts, build_aggregator
from fedsim.engine.worker import WorkerReport, configure_tensorflow, reinit_process
from fedsim.errors import FedsimError
from fedsim.results.outputs import memory_mib
from fedsim.rng import (
    STREAM_CLIENT_FAULTS,
    STREAM_DROPOUT,
    STREAM_NOISE,
    STREAM_SECAGG_GRAPH,
    stream,
)
from fedsim.secure.layout import SecureLayout


def _one_per_return(per_worker: list) -> Any:
    """A method called with Ray's ``num_returns=n`` returns n values; with n = 1
    Ray stores the return value itself, so the one worker's message goes bare."""
    return per_worker[0] if len(per_worker) == 1 else per_worker


class Server:
    def __init__(self, cfg: SimConfig, parts: Parts, input_shape: Sequence[int],
                 num_classes: int, x_test: np.ndarray, y_test: np.ndarray,
                 num_cpus: float = 1.0, initial_weights: Optional[np.ndarray] = None) -> None:
        self.reset(cfg, parts, input_shape, num_classes, x_test, y_test, num_cpus,
                   initial_weights)

    def reset(self, cfg: SimConfig, parts: Parts, input_shape: Sequence[int],
              num_classes: int, x_test: np.ndarray, y_test: np.ndarray,
              num_cpus: float = 1.0, initial_weights: Optional[np.ndarray] = None) -> None:
        """(Re)initialise for a run of ``cfg``: afterwards this server is in the state
        ``Server(<the same arguments>)`` starts in, and nothing of an earlier run
        is left (a live aggregator is closed first, Keras's session is cleared).

        parts: the run's model (its loss and metrics for :meth:`evaluate`), DP
        mechanism and algorithm (:class:`fedsim.engine.parts.Parts`).
        initial_weights: ``w_0``, the flat float32 weights of the model as
        ``cfg.seed`` builds it (:meth:`fedsim.models.spec.ModelSpec.initial_weights`;
        the simulation takes them from a worker, so that this process imports
        TensorFlow only if its aggregator uses it); None: built here.
        ``num_cpus`` sizes TensorFlow's thread pools, which a process sizes once:
        a reset must pass the value the server was constructed with
        (:class:`fedsim.engine.warm.WarmActors` keys its actors by it)."""
        if self.__dict__:  # a re-initialisation
            reinit_process(self, num_cpus)
        self._num_cpus = num_cpus
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.cfg = cfg
        self.spec = parts.model
        self._model_args = (parts.model, tuple(input_shape), int(num_classes))
        self._evaluator: Any = None  # a ClientEvaluator for evaluate(), built on first use
        if initial_weights is None:
            configure_tensorflow(num_cpus)
            initial_weights = parts.model.initial_weights(input_shape, num_classes, cfg.seed)
        self.weights = np.array(initial_weights, np.float32)
        self.algorithm = parts.algorithm
        self.opt_state = self.algorithm.initial_state(self.weights)
        self._state_fields = self.algorithm.client_state_fields(self.weights.size)
        self._store: Any = None  # the ClientStateStore (open_client_state)
        self.aggregator = build_aggregator(cfg, parts.mechanism)
        if "tensorflow" in sys.modules:  # the aggregator's (e.g. TF Privacy's), before any op
            configure_tensorflow(num_cpus)
        self.agg_state = self.aggregator.initial_state()
        self.initial_weights = self.weights.copy()  # w_0: the same on resume (seeded)
        self.audit: Any = None
        if cfg.audit.kind == "canary":  # (SciPy's statistics: imported only for the audit)
            from fedsim.privacy.audit import CanaryAudit

            self.audit = CanaryAudit(cfg.audit, cfg.seed, self.weights.size, cfg.clients,
                                     cfg.clients_per_round)
        self.x_test = x_test
        self.y_test = y_test
        self._sampler = CohortSampler(cfg.sampling, cfg.clients, sample_size(
            cfg.clients_per_round, cfg.faults, cfg.clients), cfg.seed)

    def num_parameters(self) -> int:
        return int(self.weights.size)

    def sample(self, round_num: int) -> np.ndarray:
        """The cohort sampled in ``round_num`` (sorted client ids; over-selection included)."""
        return self._sampler(round_num)

    def plan(self, round_num: int) -> RoundPlan:
        """The sampled cohort and which of its clients drop, straggle or report."""
        return plan_round(self.sample(round_num), self.cfg.clients_per_round, self.cfg.faults,
                          stream(self.cfg.seed, STREAM_CLIENT_FAULTS, round_num))

    def global_weights(self) -> np.ndarray:
        return self.weights

    def client_params(self) -> dict[str, Any]:
        """What every client of the round gets besides the weights: the
        aggregator's parameters (e.g. the clip) and, under ``algorithm``, the
        algorithm's payload."""
        params = self.aggregator.client_params(self.agg_state)
        payload = self.algorithm.client_payload(self.opt_state)
        return {**params, "algorithm": payload} if payload else params

    def apply(self, round_num: int, num_sampled: int, *reports: WorkerReport) -> dict[str, Any]:
        """Merge the workers' partial sums and take one server optimizer step.

        Returns the round's training measurements: ``train_loss`` (mean per
        example over the cohort's local training), ``num_examples``,
        ``clients`` (that reported) and the aggregator's own measurements.
        """
        partial = self.aggregator.zero_partial(self.weights.size)
        for r in reports:
            partial = self.aggregator.merge(partial, r.partial)
        return self._step(round_num, num_sampled, partial, reports)

    @staticmethod
    def _training_stats(reports: Sequence[WorkerReport]) -> dict[str, Any]:
        """train_loss (mean per example of the cohort's local training), examples, clients."""
        loss_sum = sum(r.loss_sum for r in reports)
        examples = sum(r.num_examples for r in reports)
        return {"train_loss": loss_sum / examples if examples else float("nan"),
                "num_examples": examples, "clients": sum(r.num_clients for r in reports)}

    def _add_canaries(self, round_num: int, partial: Partial) -> tuple[Partial, int]:
        """Fold this round's canary updates into the sum, through the aggregator's
        own ``accumulate`` (clipped and counted like any client's update)."""
        assert self.audit is not None  # (called only with audit.kind=canary)
        ids = self.audit.participants(round_num)
        params = self.aggregator.client_params(self.agg_state)
        clip = self.aggregator.current_clip(self.agg_state)
        norm = self.cfg.audit.canary_norm or (clip if clip is not None else 1.0)
        weight = partial.weight / partial.count if partial.count else 1.0
        for i in ids:
            partial = self.aggregator.accumulate(params, partial, self.audit.update(i, norm),
                                                 weight)
        return partial, len(ids)

    def audit_estimate(self, rounds: int, delta: float) -> dict[str, Any]:
        """The canary audit's empirical epsilon for the model as it is now."""
        # Updates are pseudo-gradients (w <- w - lr * update), so the canaries'
        # directions show in w_0 - w_T, the sum of the applied updates.
        assert self.audit is not None, "audit.kind=canary asks for an estimate"
        return self.audit.estimate(self.initial_weights - self.weights, rounds, delta)

    def open_client_state(self, resume_round: Optional[int] = None) -> Optional[str]:
        """Before round 1: create the store of a stateful algorithm's client states
        at ``algorithm.state_dir`` (refused unless new or empty), or, resuming
        after round ``resume_round``, open it and roll it back to that round.
        Returns its directory (None: the algorithm keeps no client state)."""
        if not self._state_fields:
            return None
        from fedsim.client.state import ClientStateStore

        root = self.cfg.algorithm.state_dir
        assert root is not None, "the driver resolves algorithm.state_dir"
        if resume_round is None:
            self._store = ClientStateStore.create(root, self.cfg.clients, self._state_fields,
                                                  self.cfg.algorithm.state_shard_clients)
        else:
            self._store = ClientStateStore(root)
            if self._store.fields != self._state_fields:
                raise FedsimError(f"algorithm.state_dir={root}: its client states have "
                                  f"fields {self._store.fields}, the run needs "
                                  f"{self._state_fields}")
            self._store.rollback(resume_round)
        return str(root)

    def client_state_checkpointed(self, round_num: int) -> None:
        """A checkpoint of ``round_num`` is written: the store forgets what it kept
        to go back before it."""
        if self._store is not None:
            self._store.prune(round_num)

    def aggregator_state_bytes(self) -> int:
        """The bytes of the aggregator's state the server holds between rounds (e.g.
        a correlated-noise mechanism's buffers)."""
        return int(sum(np.asarray(v).nbytes for v in flatten_state(self.agg_state)))

    def client_state_bytes(self) -> int:
        """The disk space the clients' stored states take (0: none)."""
        return self._store.bytes_on_disk() if self._store is not None else 0

    def _step(self, round_num: int, num_sampled: int, partial: Partial,
              reports: Sequence[WorkerReport]) -> dict[str, Any]:
        canaries = None
        if self.audit is not None:
            partial, canaries = self._add_canaries(round_num, partial)
        update, self.agg_state, measurements = self.aggregator.finalize(
            self.agg_state, partial, num_sampled,
            stream(self.cfg.noise_root(), STREAM_NOISE, round_num))
        sums: dict[str, tuple[np.ndarray, float]] = {}
        for r in reports:
            sums = add_sums(sums, r.sums)
        self.opt_state, self.weights = self.algorithm.apply(self.opt_state, self.weights, update,
                                                            sums)
        out = self._training_stats(reports)
        if self._store is not None:
            out["client_states_written"] = self._store.commit(
                round_num, [r.state_file for r in reports])
        # float64 squares (exact) summed pairwise: not a BLAS dot, whose float32
        # rounding depends on the CPU's kernels
        out["update_norm"] = float(np.sqrt(np.sum(np.square(update, dtype=np.float64))))
        out.update(measurements)
        if canaries is not None:
            out["canaries"] = canaries
        return out

    # -- secure aggregation: the server's side of each protocol round (secure/session.py)
    def secagg_begin(self, round_num: int, sampled: Sequence[int],
                     workers: int) -> tuple[SecureLayout, list[list[int]]]:
        """Start a round's protocol for the ``sampled`` clients; returns the
        fixed-point layout the clients use and each worker's shard of clients
        (:class:`fedsim.secure.session.ServerSession`). The aggregator says how
        records are bounded (its clip; without one ``secagg.clip`` bounds each
        coordinate) and may bring its own codec for the update (e.g. noise shares)."""
        from fedsim.secure.session import ServerSession

        sa = self.cfg.secagg
        zero = self.aggregator.zero_partial(self.weights.size)
        clip = self.aggregator.current_clip(self.agg_state)
        n = max(len(sampled), 1)
        self._secure = ServerSession(
            sa, sampled, workers, sa.clip if clip is None else clip,
            [zero.total.size] + [e.size for e in zero.extras],
            self.aggregator.secure_codec(n, sa.precision_bits),
            int(stream(self.cfg.seed, STREAM_SECAGG_GRAPH, round_num).integers(2**62)))
        return self._secure.layout, self._secure.shards

    def secagg_keys(self, *adverts: list) -> Any:
        """Round 0: the neighbours' keys, one dict per worker (call with
        ``num_returns`` = workers)."""
        return _one_per_return(self._secure.keys(adverts))

    def secagg_route(self, *shares: list) -> Any:
        """Round 1: the encrypted shares, one dict per worker."""
        return _one_per_return(self._secure.route(shares))

    def secagg_collect(self, round_num: int, *reports: WorkerReport) -> Any:
        """Round 2: the masked inputs in; the unmask requests out, one dict per
        worker (dropouts from the stream ``(seed, DROPOUT, round)``)."""
        self._secure_reports = reports
        return _one_per_return(self._secure.collect(
            itertools.chain(*(r.masked for r in reports)),
            stream(self.cfg.seed, STREAM_DROPOUT, round_num)))

    def secagg_finish(self, round_num: int, num_sampled: int,
                      *responses: tuple[list, float]) -> dict[str, Any]:
        """Round 3: unmask the sum, decode it, then aggregate and step as ``apply`` does.

        If too few shares arrive the protocol aborts: the round's update is
        discarded, the model, algorithm and aggregator states stay as they were,
        no privacy is spent, and the measurements say why.
        """
        session, reports = self._secure, self._secure_reports
        total, base, aborted = session.unmask(responses)
        if aborted is not None:
            return {**base, **self._training_stats(reports), "update_norm": 0.0,
                    "secagg": "aborted", "secagg_error": str(aborted)}
        clear = Partial(np.zeros(0), 0.0, 0)
        for r in reports:
            clear = merge_partials(clear, r.partial)
        # exact noise on the integer sum, before decoding (None: the aggregator adds none)
        layout = session.layout
        units = self.aggregator.integer_noise(
            stream(self.cfg.noise_root(), STREAM_NOISE, round_num), layout.sizes[0],
            layout.codecs[0].scale)
        assert total is not None  # (not aborted)
        decoded = layout.decode_sum(total, clear.count, units)
        partial = Partial(decoded[0], clear.weight, clear.count, clear.stats,
                          tuple(decoded[1:]))
        out = self._step(round_num, num_sampled, partial, reports)
        out.update(base, secagg="ok")
        return out

    def memory(self) -> dict[str, float]:
        return memory_mib()

    def close(self) -> None:
        """Release what the aggregator holds outside Python (a TFF aggregator's
        C++ ``worker_binary`` child process) and the client-state store's files."""
        self.aggregator.close()
        if getattr(self, "_store", None) is not None:
            self._store.close()

    def get_state(self) -> dict[str, Any]:
        """Weights, optimizer and aggregator state, as numpy (for checkpoints)."""
        # The aggregator state is stored as its flat list of leaves: TF Privacy's
        # states are namedtuples nested in classes, which pickle cannot name.
        return {"weights": self.weights.copy(), "opt_state": dict(self.opt_state),
                "agg_state": [np.asarray(v) for v in flatten_state(self.agg_state)]}

    def set_state(self, state: Mapping[str, Any], aggregator: bool = True) -> None:
        """Restore what :meth:`get_state` returned (exactly: dtypes are kept).

        ``aggregator=False`` keeps the aggregator's fresh state instead (the DP
        parameters changed, and its state carries them, e.g. the noise stddev)."""
        if state["weights"].shape != self.weights.shape:
            raise ValueError(f"checkpoint weights have shape {state['weights'].shape}, the "
                             f"model has {self.weights.shape}")
        self.weights = np.array(state["weights"], np.float32)
        self.opt_state = dict(state["opt_state"])
        if not aggregator:
            return
        self.agg_state = restore_state(self.aggregator.initial_state(), state["agg_state"])

    def evaluate(self) -> dict[str, Optional[float]]:
        """The global model on the test split: ``eval_loss`` (mean per example) and
        ``eval_<metric>`` for each of the spec's metrics (``eval_accuracy``): the
        ratio of its numerator and denominator sums (:mod:`fedsim.tasks.base`).

        In this process (TensorFlow, on first use); the simulation asks a worker
        instead (:meth:`fedsim.engine.worker.ClientWorker.evaluate_central`, the
        same computation)."""
        from fedsim.client.evaluation import CENTRAL_EVAL_BATCH, ClientEvaluator, central_metrics

        if self._evaluator is None:
            configure_tensorflow(self._num_cpus)
            self._evaluator = ClientEvaluator(*self._model_args, self.cfg.seed)
        return central_metrics(self._evaluator.evaluate(self.weights, -1, self.x_test,
                                                        self.y_test, CENTRAL_EVAL_BATCH))


SERVER_RAY_CPUS = 0
"""The server actor's Ray CPUs: it computes little (merging partial sums, the
server step, the noise), and the workers evaluate the global model for it."""
SERVER_TF_CPUS = 1.0
"""The CPUs the server's TensorFlow thread pools are sized to, should it import
TensorFlow (a TF Privacy aggregator, :meth:`Server.evaluate` in process)."""


def start_server(cfg: SimConfig, parts: Parts, input_shape: Sequence[int], num_classes: int,
                 x_test: Any, y_test: Any, initial_weights: Any) -> Any:
    """A server actor, as ``run_simulation`` starts one. ``x_test``, ``y_test``
    and ``initial_weights`` (``w_0``): arrays or object refs to them (e.g. a
    worker's :meth:`fedsim.engine.worker.ClientWorker.initial_weights`), which
    Ray resolves before the server starts."""
    import ray

    return ray.remote(num_cpus=SERVER_RAY_CPUS)(Server).remote(
        cfg, parts, tuple(input_shape), num_classes, x_test, y_test, SERVER_TF_CPUS,
        initial_weights)


def _tensorflow() -> Any:
    """TensorFlow if this process has imported it (then the aggregator's state may
    hold its tensors and nest in its structures), else None."""
    return sys.modules["tensorflow"] if "tensorflow" in sys.modules else None


def flatten_state(state: Any) -> list:
    """The leaves of an aggregator state in ``tf.nest.flatten``'s order:
    ``tf.nest.flatten`` itself with TensorFlow imported, else
    :func:`flatten_plain`."""
    tf = _tensorflow()
    return tf.nest.flatten(state) if tf is not None else flatten_plain(state)


def restore_state(template: Any, leaves: Sequence[Any]) -> Any:
    """:func:`flatten_state`'s inverse for a checkpoint: ``template``'s structure
    with ``leaves`` (numpy, as :meth:`Server.get_state` stored them); a leaf
    becomes a TF constant where the template holds a tensor, a Python scalar
    where it is 0-d, else stays an array (:func:`pack_plain` without TensorFlow)."""
    tf = _tensorflow()
    if tf is None:
        return pack_plain(template, leaves)
    return tf.nest.pack_sequence_as(
        template, [tf.constant(v) if tf.is_tensor(t) else v.item() if np.ndim(v) == 0
                   else v for t, v in zip(tf.nest.flatten(template), leaves)])


def flatten_plain(state: Any) -> list:
    """``tf.nest.flatten`` without TensorFlow, for the structures a state holds in
    a process without it: mappings by sorted key, lists and tuples (namedtuples
    too) in order, anything else a leaf."""
    if isinstance(state, Mapping):
        return [leaf for k in sorted(state) for leaf in flatten_plain(state[k])]
    if isinstance(state, (list, tuple)):
        return [leaf for v in state for leaf in flatten_plain(v)]
    return [state]


def pack_plain(template: Any, leaves: Sequence[Any]) -> Any:
    """:func:`flatten_plain`'s inverse: ``template``'s structure with ``leaves``
    (a 0-d leaf becomes a Python scalar). ValueError when the counts differ."""
    leaves = list(leaves)
    expected = len(flatten_plain(template))
    if len(leaves) != expected:
        raise ValueError(f"the checkpoint's aggregator state has {len(leaves)} leaves, the "
                         f"aggregator's structure {expected}")
    it = iter(leaves)

    def pack(t: Any) -> Any:
        if isinstance(t, Mapping):
            packed = {k: pack(t[k]) for k in sorted(t)}
            kind: Any = type(t)  # (a dict, or another mapping that takes pairs)
            return kind((k, packed[k]) for k in t)
        if isinstance(t, tuple) and hasattr(t, "_fields"):  # a namedtuple
            return type(t)(*[pack(v) for v in t])
        if isinstance(t, (list, tuple)):
            return type(t)(pack(v) for v in t)
        v = next(it)
        return v.item() if np.ndim(v) == 0 else v

    return pack(template)

"""The simulation: build the parts, run the rounds, summarise.

:func:`run_simulation` is the library entry point (no Hydra needed)::

    from fedsim.config import SimConfig
    from fedsim.simulation import run_simulation
    result = run_simulation(SimConfig(clients=20, rounds=3), "runs/try1")

A user's own parts plug in as objects (``data=``, ``mechanism=``,
``algorithm=``, ``callbacks=``) or, from Hydra, as ``module:callable`` names in
the config (``dp.mechanism``, ``algorithm``).

Each round the driver asks the server actor for the cohort and the global
weights (one object-store reference, shared by all workers), splits the cohort
into one contiguous shard per worker actor, and passes the workers' reports
(partial sums) straight to the server actor's ``apply``: updates move from
worker to server through the object store, never through the driver.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from fedsim.algorithms.base import Algorithm, resolve_algorithm
from fedsim.client.features import trainer_features
from fedsim.client.state import remove_store
from fedsim.config import AUTO_VECTORIZE, DPConfig, SimConfig, saved_sampling_scheme
from fedsim.data.base import FederatedData, check_federated_data
from fedsim.data.loaders import load_federated_data
from fedsim.engine.parts import Parts, check_sendable
from fedsim.engine.ray_setup import connect_ray, prepare_ray_import
from fedsim.engine.rounds import (
    RoundFailed,
    federated_evaluation,
    memory_row,
    run_round_with_retries,
)
from fedsim.errors import ConfigError, FedsimError
from fedsim.models.spec import ModelSpec, check_model, model_spec
from fedsim.privacy.accounting import (
    audit_comparison,
    build_accountant,
    calibrate,
    check_ledger,
    default_delta,
    mechanism_event,
)
from fedsim.privacy.mechanisms.base import Mechanism, resolve_mechanism
from fedsim.results.callbacks import Callback, RunContext, default_callbacks
from fedsim.results.checkpoint import (
    CheckpointError,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from fedsim.results.outputs import (
    append_jsonl,
    keep_rounds,
    memory_mib,
    plot_metrics,
    read_metrics,
    write_json_atomic,
)
from fedsim.results.summary import example_level_privacy, run_summary
from fedsim.results.tracking import tracker
from fedsim.tasks.classification import Classification

if TYPE_CHECKING:
    from fedsim.engine.warm import WarmActors

__all__ = ["SimulationResult", "run_simulation", "connect_ray", "actor_config"]


@dataclass
class SimulationResult:
    """What :func:`run_simulation` returns: every metrics row and the summary."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    output_dir: Optional[Path]
    weights: Optional[np.ndarray] = None  # the final global model, flat float32


def check_compatible(cfg: SimConfig, data: FederatedData, spec: ModelSpec) -> None:
    """Refuse model/data/task combinations that cannot train, before any actor
    starts.

    The task kind must take the data's tensors (:meth:`fedsim.tasks.base.Task.check_example`);
    a built-in model needs float32 inputs and a task whose output is
    ``[num_classes]``. A user's model (not a built-in with the default loss)
    is built once here and run on a batch of zeros
    (:func:`fedsim.models.spec.check_model`, which imports TF in the driver);
    with ``client.vectorize`` > 1 it must be one that vectorized training
    implements (:func:`fedsim.client.vectorized.check_vectorizable`).
    Federated evaluation needs clients with test data of their own.
    """
    task, example = spec.kind, spec.layout
    problem = task.check_example(example)
    if problem is not None:
        raise ConfigError("data", f"data for task {task.name}: {problem}", data.name)
    if cfg.federated_eval.enabled and not callable(getattr(data.train, "client_test", None)):
        raise ConfigError("federated_eval.clients", f"0 for data={data.name} (its clients hold "
                          "no test data of their own, the client_test capability; use a "
                          "natively federated dataset such as tff_client_data or leaf)",
                          cfg.federated_eval.clients)
    classifies = isinstance(task, Classification)
    if cfg.client.per_call > 1 and not (example.is_default and classifies):
        raise ConfigError("client.vectorize", f"0 or 1 for task {task.name} on "
                          f"{example.input_dtype} inputs (vectorized training supports "
                          "classification of float32 inputs)", cfg.client.vectorize)
    if spec.is_builtin:
        if spec.name == "cnn" and len(data.input_shape) != 3:
            raise ConfigError("model", f"logreg or mlp for data={data.name} (its examples have "
                              f"shape {data.input_shape}; cnn needs images)", "cnn")
        if example.input_dtype != "float32":
            raise ConfigError("model", f"model=keras with an embedding for data={data.name} "
                              f"(its inputs are {example.input_dtype} token ids; {spec.name} "
                              "needs float32 features)", spec.name)
        out_shape = task.output_shape(example, data.num_classes)
        if out_shape != (data.num_classes,):
            raise ConfigError("model", f"model=keras for task {task.name} (its output is "
                              f"{list(out_shape)} per example; {spec.name} outputs "
                              f"[{data.num_classes}])", spec.name)
        if classifies and not spec.own_metrics:
            return
    option = "model.builder" if cfg.model.builder is not None else "model"
    check_model(spec, data.input_shape, data.num_classes, cfg.seed, option)
    if cfg.client.per_call > 1:
        from fedsim.client.vectorized import check_vectorizable

        check_vectorizable(spec, data.input_shape, data.num_classes, cfg.seed, cfg.batch_size,
                           cfg.client.vectorize)


def _kept_rows(run_dir: Path, ckpt_round: int) -> list[dict[str, Any]]:
    """The metrics rows of rounds 1..ckpt_round that a resumed run keeps."""
    path = run_dir / "metrics.jsonl"
    try:
        rows = [r for r in read_metrics(path) if r["round"] <= ckpt_round]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"resume={run_dir}: cannot read {path} ({err})") from err
    if [r["round"] for r in rows] != list(range(1, ckpt_round + 1)):
        raise CheckpointError(f"resume={run_dir}: {path} does not hold rounds 1..{ckpt_round} "
                              "of the checkpoint")
    return rows


def _prepare_output(output_dir: Optional[Path], resuming: bool = False) -> Optional[Path]:
    if output_dir is None:
        return None
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise FedsimError(f"output directory {out}: cannot write there ({err.strerror})") from err
    if not resuming and ((out / "summary.json").exists() or (out / "metrics.jsonl").exists()):
        raise FedsimError(f"output directory {out} already holds a run (metrics.jsonl or "
                          "summary.json); choose an empty one")
    return out


def actor_config(cfg: SimConfig) -> SimConfig:
    """The config the actors get: ``dp.noise_seed=os`` resolved to 64 bits of fresh
    entropy from the operating system (``secrets``), which is never written
    anywhere (summary, metrics and checkpoints keep ``os``)."""
    if cfg.dp.noise_seed != "os":
        return cfg
    return dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp,
                                                           noise_seed=secrets.randbits(64)))


def _model_size(cfg: SimConfig, data: FederatedData, spec: ModelSpec) -> int:
    """The number of trainable parameters (a user's model is built here, in the driver)."""
    return spec.num_parameters(data.input_shape, data.num_classes, cfg.seed)


def _calibrated(cfg: SimConfig, data: FederatedData, resumed: Optional[dict[str, Any]],
                spec: ModelSpec, mechanism: Mechanism) -> tuple[SimConfig, dict[str, Any], bool]:
    """``cfg`` with the noise that spends ``dp.target_epsilon`` over the whole run.

    A resumed run keeps the checkpoint's calibrated noise when its ledger plus the
    rounds left still meet the target (the same run continued: bit-identical);
    otherwise (e.g. more ``rounds``) the rounds left are calibrated so that the
    ledger plus them spend the target. Returns the config, what the summary
    records, and whether the noise changed on resume.
    """
    dim = _model_size(cfg, data, spec) if cfg.secagg.protocol != "none" else None
    ledger = resumed["ledger"] if resumed else []
    done = resumed["round"] if resumed else 0
    if resumed:
        saved = dict(resumed["config"]["dp"])
        same = {**saved, "noise_multiplier": cfg.dp.noise_multiplier,
                "epsilon": cfg.dp.epsilon} == dataclasses.asdict(cfg.dp)
        if same and done < cfg.rounds:
            kept = dataclasses.replace(cfg, dp=DPConfig(**saved))
            acct = build_accountant(kept, dim, mechanism)
            acct.restore(ledger)
            event = acct.round_event(mechanism_event(kept.dp, kept.clients_per_round,
                                                     mechanism=mechanism))
            target = cfg.dp.target_epsilon
            assert target is not None  # (calibration is asked for a target)
            if acct.epsilon_after(event, cfg.rounds - done) <= target:
                return kept, {"noise_multiplier": kept.dp.noise_multiplier,
                              "epsilon_per_round": kept.dp.epsilon,
                              "from_checkpoint": True}, False
    dp = calibrate(cfg, ledger, done, dim, mechanism)
    info: dict[str, Any] = {"noise_multiplier": dp.noise_multiplier,
                            "epsilon_per_round": dp.epsilon,
                            "rounds_calibrated": cfg.rounds - done}
    changed = False
    if resumed:
        old = resumed["config"]["dp"]
        changed = (old["noise_multiplier"], old["epsilon"]) != (dp.noise_multiplier, dp.epsilon)
        info["ledger_rounds"] = done
    return dataclasses.replace(cfg, dp=dp), info, changed


def run_simulation(cfg: SimConfig, output_dir: Optional[os.PathLike | str] = None, *,
                   data: Optional[FederatedData] = None, model: Any = None,
                   mechanism: Optional[Mechanism] = None, algorithm: Optional[Algorithm] = None,
                   callbacks: Sequence[Callback] = (),
                   actors: Optional[WarmActors] = None) -> SimulationResult:
    """Run a whole federated simulation and write its outputs to ``output_dir``.

    Your own parts, instead of the ones ``cfg`` names (``Extending fedsim`` in
    the README):

    - data: a :class:`fedsim.data.base.FederatedData` (its ``train`` any object
      with ``num_clients`` and ``client(cid) -> (x, y)``) instead of loading
      ``cfg.data``; the population is clients ``0 .. cfg.clients - 1`` of it.
    - model: a :class:`fedsim.models.spec.ModelSpec` or a builder
      ``(input_shape, num_classes, seed) -> tf.keras.Model`` instead of
      ``cfg.model`` (:func:`fedsim.models.spec.model_spec`).
    - mechanism: a :class:`fedsim.privacy.mechanisms.base.Mechanism` instead of
      the one ``cfg.dp.mechanism`` names.
    - algorithm: a :class:`fedsim.algorithms.base.Algorithm` instead of
      ``cfg.algorithm``.
    - callbacks: :class:`fedsim.results.callbacks.Callback` objects, called
      around the rounds (before the built-in writers, so keys they add to a
      round's row are logged).

    Objects must pickle (Ray sends them to the actors); if one does not, a
    FedsimError naming it says why, before any actor starts. Bad configuration
    and unreadable data raise :class:`FedsimError` before any output file is
    written. Uses the running Ray instance if there is one, otherwise starts
    (and afterwards stops) one as ``cfg.ray`` says.

    ``actors``: a :class:`fedsim.engine.warm.WarmActors` to take the server and
    worker actors from (reset for this run, started if missing) and to give them
    back to afterwards, alive; None starts new actors and stops them at the end.
    The results are the same either way.
    """
    t_start = time.perf_counter()
    prepare_ray_import(cfg.ray)  # (the pickle check below imports Ray)
    for option, given in (("data", data), ("model", model), ("mechanism", mechanism),
                          ("algorithm", algorithm)):
        if given is not None:
            check_sendable(given, option)
    data = (load_federated_data(cfg.data, cfg.clients, cfg.seed) if data is None
            else check_federated_data(data, cfg.clients))
    spec = model_spec(cfg.model, model, task=data.task, example=data.example)
    check_compatible(cfg, data, spec)
    mech = resolve_mechanism(mechanism if mechanism is not None else cfg.dp.mechanism)
    if mechanism is not None:  # the config names what runs (summary, checkpoints)
        cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, mechanism=_name(mechanism)))
    mech.check(cfg)
    algo = resolve_algorithm(algorithm if algorithm is not None else cfg.algorithm, cfg)
    if algorithm is not None:
        cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm,
                                                                     name=_name(algorithm)))
    check_algorithm(cfg, algo)
    cfg = resolve_vectorize(cfg, spec, algo)
    accounted = mech.private or cfg.aggregator.kind == "tff"  # a TFF factory's own events
    privacy: dict[str, Any] = {}
    resumed: Optional[dict[str, Any]] = None
    kept: list[dict[str, Any]] = []
    if cfg.resume is not None:
        resumed = load_checkpoint(Path(cfg.resume))
        planned = resumed["config"].get("rounds")
        if mech.fixed_rounds and planned is not None and planned != cfg.rounds:
            raise CheckpointError(f"resume: rounds={cfg.rounds} differs from the checkpoint's "
                                  f"{planned}, for which dp.mechanism={cfg.dp.mechanism} planned "
                                  "its noise; resume with the same rounds")
    fresh_aggregator = False  # the noise changed on resume: the aggregator starts afresh
    if mech.private and cfg.dp.target_epsilon is not None:
        cfg, privacy["calibrated"], fresh_aggregator = _calibrated(cfg, data, resumed, spec, mech)
    if resumed is not None:
        saved = resumed["config"]
        if fresh_aggregator:  # recalibrated for the same target: not a change of budget
            saved = {**saved, "dp": {**saved["dp"], "noise_multiplier": cfg.dp.noise_multiplier,
                                     "epsilon": cfg.dp.epsilon}}
        privacy["changes_on_resume"] = check_resumable(saved, cfg)
        fresh_aggregator = fresh_aggregator or "dp" in privacy["changes_on_resume"]
        if accounted:
            check_ledger(cfg, resumed["ledger"], resumed["config"])
        output_dir = run_dir = Path(str(cfg.resume))
        kept = _kept_rows(run_dir, resumed["round"])
    out = _prepare_output(Path(output_dir) if output_dir is not None else None,
                          resuming=resumed is not None)
    if out is not None and resumed is not None:
        keep_rounds(out / "client_eval.jsonl", resumed["round"])

    accountant = None
    state_dir, temporary_state = _client_state_dir(cfg, algo, out)
    actor_cfg = actor_config(cfg)
    if state_dir is not None:
        actor_cfg = dataclasses.replace(actor_cfg, algorithm=dataclasses.replace(
            actor_cfg.algorithm, state_dir=str(state_dir)))
    parts = Parts(spec, mech, algo)
    started = connect_ray(cfg.ray)
    import ray

    from fedsim.engine.server import start_server
    from fedsim.engine.worker import make_pool, make_worker, pool_size

    rows: list[dict[str, Any]] = list(kept)
    first_round = resumed["round"] + 1 if resumed else 1
    stop_reason = f"reached rounds={cfg.rounds}"
    hooks = default_callbacks(cfg, callbacks, tracker(cfg.tracking))
    pool = server = None
    try:
        data_ref = ray.put(data.train)
        # The central test split, once in the object store: the server's (for its
        # in-process evaluate) and worker 0's, which evaluates for it each round.
        x_test, y_test = ray.put(data.x_test), ray.put(data.y_test)
        resources = ray.cluster_resources()
        n_workers = pool_size(cfg, resources.get("CPU", 1.0), resources.get("GPU", 0.0))
        if actors is None:
            pool = make_pool(actor_cfg, parts, data_ref, data.input_shape, data.num_classes,
                             n_workers)
            # w_0 from a worker (the server's process needs no TensorFlow of its own)
            server = start_server(actor_cfg, parts, data.input_shape, data.num_classes,
                                  x_test, y_test, pool.actors[0].initial_weights.remote())
        else:
            server, pool = actors.acquire(actor_cfg, parts, data_ref, data.input_shape,
                                          data.num_classes, x_test, y_test, n_workers)
        workers = pool.actors
        num_parameters = ray.get(server.num_parameters.remote())
        accountant = build_accountant(cfg, num_parameters, mech) if accounted else None
        if resumed:
            if accountant:
                accountant.restore(resumed["ledger"],
                                   saved_sampling_scheme(resumed["config"].get("sampling")),
                                   resumed["config"]["dp"].get("accountant"))
            # Changed DP parameters (resume_force, or a recalibrated noise) start the
            # aggregator afresh: its state carries the old ones (noise stddev, clip).
            ray.get(server.set_state.remote(resumed["server"], not fresh_aggregator))
        if state_dir is not None:  # (resuming: rolled back to the checkpoint's round)
            ray.get(server.open_client_state.remote(resumed["round"] if resumed else None))
        placement = ray.get([w.where.remote() for w in workers])
        setup_seconds = time.perf_counter() - t_start

        def checkpoint(rnd: int) -> None:
            if out is not None:
                save_checkpoint(out, {
                    "round": rnd, "config": asdict(cfg),
                    "server": ray.get(server.get_state.remote()),
                    "ledger": accountant.ledger if accountant else []})
                ray.get(server.client_state_checkpointed.remote(rnd))

        ctx = RunContext(cfg, out, rows, first_round, accountant,
                         accountant.round_event(mech.worst_round_event(cfg, num_parameters))
                         if accountant else None,
                         checkpoint, lambda: memory_row(ray, server, workers))
        for hook in hooks:
            hook.on_run_start(ctx)

        def restart(i: int) -> Any:
            return make_worker(actor_cfg, parts, data_ref, data.input_shape, data.num_classes, i,
                               pool)

        for rnd in range(first_round, cfg.rounds + 1):
            reason = next((r for r in (h.stop_before_round(ctx, rnd) for h in hooks) if r), None)
            if reason:
                stop_reason = reason
                break
            t0 = time.perf_counter()
            try:
                row = run_round_with_retries(ray, cfg, server, workers, rnd, restart)
            except RoundFailed as err:
                for hook in hooks:
                    hook.on_failure(ctx, rnd - 1)
                raise FedsimError(str(err) + (f"; continue with resume={out}" if out else "")
                                  ) from err.__cause__
            if accountant and "dp_event" in row:
                accountant.record(accountant.round_event(row.pop("dp_event")))
            if accountant and (accountant.ledger or mech.private):
                row.update(epsilon=accountant.epsilon(), delta=accountant.delta)
            row["round_seconds"] = time.perf_counter() - t0
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                t1 = time.perf_counter()
                row.update(ray.get(workers[0].evaluate_central.remote(
                    server.global_weights.remote(), x_test, y_test)))
                row["eval_seconds"] = time.perf_counter() - t1
                if cfg.federated_eval.enabled:
                    t1 = time.perf_counter()
                    fed_row, per_client = federated_evaluation(ray, cfg, server, workers, rnd)
                    row.update(fed_row, fed_eval_seconds=time.perf_counter() - t1)
                    if out is not None:
                        append_jsonl(out / "client_eval.jsonl", per_client)
            else:
                row.update(eval_loss=None, **{f"eval_{k}": None for k in spec.metrics})
            rows.append(row)
            for hook in hooks:
                hook.on_round_end(ctx, row)
        for hook in hooks:
            hook.on_run_end(ctx)
        final_weights = ray.get(server.global_weights.remote())
        if cfg.client.optimizer == "dp_sgd":
            # Who trained when: every round's plan again (cheap, seeded; also the
            # rounds before a resume).
            counts: dict[int, int] = {}
            for plan in ray.get([server.plan.remote(r["round"]) for r in rows]):
                for cid in plan.reporting.tolist():
                    counts[cid] = counts.get(cid, 0) + 1
            privacy["example_level"] = example_level_privacy(cfg, data, counts)
        audit = (ray.get(server.audit_estimate.remote(
            rows[-1]["round"] if rows else 0,
            accountant.delta if accountant else default_delta(cfg.clients)))
            if cfg.audit.kind == "canary" else None)
        if audit is not None:  # canaries join as Poisson-sampled add/remove neighbours
            audit.update(audit_comparison(accountant, cfg.clients_per_round))
        memory = {"driver": memory_mib(), "server": ray.get(server.memory.remote()),
                  "workers": ray.get([w.memory.remote() for w in workers]),
                  "aggregator_state_mib": ray.get(server.aggregator_state_bytes.remote()) / 2**20}
        if state_dir is not None:
            memory["client_state_disk_mib"] = (
                ray.get(server.client_state_bytes.remote()) / 2**20)
    finally:
        raised = failed = sys.exc_info()[0] is not None
        if server is not None and ray.is_initialized():
            try:  # stops e.g. a TFF aggregator's worker_binary child
                ray.get(server.close.remote(), timeout=15)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                # gone already, or stuck: the kill below ends it (and TFF's
                # watchdogs then stop its worker_binary); never reused
                failed = True
            if actors is None:
                ray.kill(server)  # now, not whenever the handle is collected
        if raised:  # (else after the summary, which on_summary hooks see)
            for hook in hooks:
                hook.close()
        if actors is not None and ray.is_initialized():
            actors.release(server, pool, failed=failed)  # kept alive, unless it failed
        elif pool is not None and pool.placement_group is not None and ray.is_initialized():
            ray.util.remove_placement_group(pool.placement_group)
        if started:
            ray.shutdown()
        if temporary_state and state_dir is not None:
            remove_store(state_dir)

    try:
        summary = run_summary(cfg, data, rows, accountant, privacy, audit, mech,
                              started=t_start, setup_seconds=setup_seconds,
                              stop_reason=stop_reason,
                              resumed_from=resumed["round"] if resumed else None,
                              workers=n_workers, placement=placement, memory=memory,
                              num_parameters=num_parameters, model=spec.name, task=spec.kind)
        if out:
            plot_metrics(rows, out / "metrics.png", audit_epsilon=audit and audit["epsilon"],
                         metric=spec.kind.primary_metric, bounded=spec.kind.higher_is_better,
                         title=f"{spec.name} on {data.name}, {cfg.clients} clients, "
                               f"{cfg.clients_per_round}/round, dp={cfg.dp.mechanism}")
            write_json_atomic(out / "summary.json", summary)
        for hook in hooks:
            hook.on_summary(ctx, summary, final_weights)
    finally:
        for hook in hooks:
            hook.close()
    return SimulationResult(rows, summary, out, final_weights)


def check_algorithm(cfg: SimConfig, algo: Algorithm) -> None:
    """Refuse, in one line, an algorithm the configured trainer cannot run."""
    missing = sorted(set(algo.client_features) - trainer_features(cfg))
    if missing:
        honoured = sorted(trainer_features(cfg)) or "none"
        raise ConfigError("algorithm.name", f"an algorithm whose clients need only what the "
                          f"trainer honours (client.optimizer={cfg.client.optimizer}, "
                          f"client.vectorize={cfg.client.vectorize} honours {honoured}; it "
                          f"needs {', '.join(missing)})", cfg.algorithm.name)
    own_client_side = type(algo).client_update is not Algorithm.client_update
    if cfg.client.per_call > 1 and (own_client_side or algo.client_state_fields(1)):
        raise ConfigError("client.vectorize", "0 or 1 with an algorithm that has a client "
                          "side of its own (client_update or client state; the vectorized "
                          "trainer runs plain FedAvg steps)", cfg.client.vectorize)


def resolve_vectorize(cfg: SimConfig, spec: ModelSpec, algo: Algorithm) -> SimConfig:
    """``cfg`` with ``client.vectorize=auto`` replaced by a number: ``AUTO_VECTORIZE``
    clients per call where the vectorized trainer runs exactly what one client
    at a time would (client SGD, an algorithm without client options, a client
    side or client state of its own, a built-in model with its default loss
    classifying float32 inputs), else 0 (one at a time). The CNN is vectorized
    only on workers of 2 or more CPUs (``ray.cpus_per_worker``): per core its
    batch-10 convolutions run as fast one client at a time as grouped, and what
    stacking buys it is the use of several cores by one process. A number is
    kept."""
    if cfg.client.vectorize != "auto":
        return cfg
    name = cfg.algorithm.name
    plain = (not algo.client_features and not algo.client_state_fields(1)
             and type(algo).client_update is Algorithm.client_update
             and (name == "fedavg" or ":" in name))
    fits = (cfg.client.optimizer == "sgd" and plain and spec.is_builtin
            and not spec.own_metrics and isinstance(spec.kind, Classification)
            and spec.layout.is_default
            and (cfg.model.name != "cnn" or cfg.ray.cpus_per_worker >= 2))
    return dataclasses.replace(cfg, client=dataclasses.replace(
        cfg.client, vectorize=AUTO_VECTORIZE if fits else 0))


def _client_state_dir(cfg: SimConfig, algo: Algorithm, out: Optional[Path]
                      ) -> tuple[Optional[Path], bool]:
    """Where a stateful algorithm keeps the clients' states: ``algorithm.state_dir``,
    else the run directory's ``client_state/``, else (no outputs) a new temporary
    directory, removed after the run (the second value). (None, False): stateless.
    Absolute: the actors open it, and their working directory is not the driver's
    (Ray's working_dir on a cluster; the one Ray started in, locally)."""
    if not algo.client_state_fields(1):
        return None, False
    if cfg.algorithm.state_dir is not None:
        return Path(cfg.algorithm.state_dir).absolute(), False
    if out is not None:
        return out.absolute() / "client_state", False
    return Path(tempfile.mkdtemp(prefix="fedsim-client-state-")), True


def _name(obj: Any) -> str:
    """How the config records a part given as an object: ``module:QualName``."""
    return f"{type(obj).__module__}:{type(obj).__qualname__}"

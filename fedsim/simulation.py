"""The simulation loop: data -> worker actors -> server actor -> outputs.

:func:`run_simulation` is the library entry point (no Hydra needed)::

    from fedsim.config import SimConfig
    from fedsim.simulation import run_simulation
    result = run_simulation(SimConfig(clients=20, rounds=3), "runs/try1")

Each round the driver asks the server actor for the cohort and the global
weights (one object-store reference, shared by all workers), splits the cohort
into one contiguous shard per worker actor, and passes the workers' reports
(partial sums) straight to the server actor's ``apply``: updates move from
worker to server through the object store, never through the driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from fedsim.privacy import noise
from fedsim.privacy.accounting import (audit_comparison, build_accountant, calibrate, check_ledger, default_delta, mechanism_event)
from fedsim.results.checkpoint import (CheckpointError, check_resumable, load_checkpoint, save_checkpoint)
from fedsim.config import DPConfig, RayConfig, SimConfig
from fedsim.data.base import FederatedData
from fedsim.data.loaders import load_federated_data
from fedsim.errors import ConfigError, FedsimError
from fedsim.results.outputs import (MetricsLog, Progress, TensorBoardLog, memory_mib, plot_metrics, read_metrics, versions, write_json_atomic)

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Never shipped to cluster nodes with the working directory: earlier runs' outputs.
RUNTIME_ENV_EXCLUDES = ["outputs/", "multirun/", "checkpoints/", ".venv/", ".git/",
                        "**/__pycache__/", ".pytest_cache/"]


@dataclass
class SimulationResult:
    """What :func:`run_simulation` returns: every metrics row and the summary."""

    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    output_dir: Optional[Path]
    weights: Optional[np.ndarray] = None  # the final global model, flat float32


def check_compatible(cfg: SimConfig, data: FederatedData) -> None:
    """Refuse model/data combinations that cannot train, before any actor starts."""
    if cfg.model.name == "cnn" and len(data.input_shape) != 3:
        raise ConfigError("model", f"logreg or mlp for data={data.name} (its examples have "
                          f"shape {data.input_shape}; cnn needs images)", "cnn")


NOT_PRIVATIZED = ("per-round metrics computed on the clients' exact data and released "
                  "without noise: train_loss, num_examples, clients, clipped_fraction, "
                  "zeroed, dropped, stragglers (and the evaluation on the central test split)")


def privacy_summary(cfg: SimConfig, accountant: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """What the run spent, and the assumptions the number rests on."""
    if accountant is None or (cfg.dp.mechanism == "none" and not accountant.ledger):
        return {"mechanism": "none", "epsilon": None, **extra}
    mechanism = (cfg.dp.mechanism if cfg.dp.mechanism != "none"
                 else f"tff:{cfg.aggregator.factory}")  # the TFF factory's own events
    eps = accountant.epsilon()
    out = {"mechanism": mechanism, "epsilon": eps if np.isfinite(eps) else "inf",
           "delta": accountant.delta, "accountant": accountant.kind,
           "neighboring_relation": accountant.relation.name, "sampling": cfg.sampling,
           "noise_multiplier": cfg.dp.noise_multiplier,
           "rounds_accounted": sum(c for _, c in accountant.ledger),
           "noise_sampler": noise.sampler_for(cfg.dp.mechanism, cfg.dp.noise_sampler),
           "noise_seed": cfg.dp.noise_seed,
           "secure_rounding_charged": (
               dict(zip(("model_size", "precision_bits"), accountant.secure_rounding))
               if accountant.secure_rounding else None),
           "not_privatized": NOT_PRIVATIZED,
           "ledger": [{"event": repr(e), "count": c} for e, c in accountant.ledger]}
    out.update(extra)
    return out


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, naming ``address``, when nothing listens at its host:port.

    Ray's own connection attempts retry for minutes against a dead address;
    one TCP connect with a timeout bounds the wait. ``auto`` is left to Ray
    (it looks up the local cluster's address, and fails at once without one).
    """
    import socket

    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (
            getattr(err, "strerror", None) or str(err))
        raise FedsimError(f"ray.address={address!r}: no Ray cluster answers there within "
                          f"ray.connect_timeout_s={timeout_s:g} ({reason})") from err


@contextlib.contextmanager
def _stderr_kept_back() -> Iterator[None]:
    """Hold back what C++ code writes to file descriptor 2 (Ray's GCS client logs
    every failed connection attempt) and replay it only if the block succeeds, so
    that a failed connection ends in our one error line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


def example_level_privacy(cfg: SimConfig, data: FederatedData,
                          participations: Mapping[int, int]) -> dict[str, Any]:
    """Example-level DP of the clients' DP-SGD (``client.optimizer=dp_sgd``).

    Each client's epsilon composes its DP-SGD over the rounds it took part in
    (``participations``: client id -> rounds) and depends on its data size;
    reported is the largest over all clients that trained (the worst case),
    with that client's size, participations and the DP-SGD steps charged
    (per round and in all), which are exactly the steps its trainer ran.
    ``batch_sampling`` names the batches (``client.batch_sampling``) and
    ``assumption`` the analysis: amplification by Poisson sampling, or the
    bound for shuffled fixed-size batches without amplification
    (:func:`fedsim.client.dp_sgd.shuffle_round_event`).
    """
    from fedsim.client.dp_sgd import (ASSUMPTIONS, client_example_epsilon, microbatch_size, round_steps)

    c = cfg.client
    m = microbatch_size(cfg.batch_size, c.num_microbatches)
    worst: dict[str, Any] = {"epsilon": 0.0, "num_examples": None, "participations": 0,
                             "steps_per_round": 0, "steps": 0}
    for n, rounds in sorted({(len(data.train.client(cid)[1]), k)
                             for cid, k in participations.items()}):
        eps = client_example_epsilon(n, cfg.batch_size, c.noise_multiplier, cfg.local_epochs,
                                     rounds, c.delta, batch_sampling=c.batch_sampling,
                                     microbatch_size=m)
        if eps > worst["epsilon"]:
            per_round = round_steps(n, cfg.batch_size, cfg.local_epochs,
                                    batch_sampling=c.batch_sampling, microbatch_size=m)
            worst = {"epsilon": eps, "num_examples": n, "participations": rounds,
                     "steps_per_round": per_round, "steps": per_round * rounds}
    return {"epsilon": worst["epsilon"] if math.isfinite(worst["epsilon"]) else "inf",
            "delta": c.delta, "worst_client": {k: worst[k] for k in (
                "num_examples", "participations", "steps_per_round", "steps")},
            "l2_norm_clip": c.l2_norm_clip, "noise_multiplier": c.noise_multiplier,
            "batch_sampling": c.batch_sampling, "assumption": ASSUMPTIONS[c.batch_sampling],
            "adjacency": "add or remove one example", "noise_sampler": noise.GAUSSIAN_SAMPLER,
            "noise_seed": cfg.dp.noise_seed}


def connect_ray(rc: RayConfig) -> bool:
    """Start or join Ray as configured; returns True if this call started it.

    address None: a local instance with ``num_cpus``. ``auto`` or
    ``ray://host:port``: an existing cluster, to which this project's directory is
    shipped as the workers' working_dir (outputs excluded).
    """
    if rc.address is None and "ray" not in sys.modules:
        # A local instance's workers run this very interpreter and environment, so
        # Ray's `uv run` hook (which would rebuild the venv for them) is not needed.
        # Ray reads this switch when it is first imported.
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if rc.address is not None and "ray" not in sys.modules:
        # Ray retries a silent cluster address once a second, 20 times by default.
        os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES",
                              str(max(1, math.ceil(rc.connect_timeout_s))))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}}
    with warnings.catch_warnings():
        # TF 2.14 caps typing-extensions below what pydantic 2 needs, so Ray sees v1.
        warnings.filterwarnings("ignore", message="Pydantic v1", category=FutureWarning)
        if rc.address is None:
            # "local": always a new instance, never a cluster someone started here.
            ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=False,
                     log_to_driver=True, logging_level="WARNING", runtime_env=env)
            return True
        env.update(working_dir=str(PROJECT_DIR), excludes=RUNTIME_ENV_EXCLUDES)
        _check_reachable(rc.address, rc.connect_timeout_s)
        try:
            with _stderr_kept_back():
                ray.init(address=rc.address, logging_level="WARNING", runtime_env=env)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise FedsimError(f"ray.address={rc.address!r}: cannot connect to a Ray cluster "
                              f"there ({str(err).splitlines()[0]})") from err
    return True


def _run_round(ray: Any, cfg: SimConfig, server: Any, workers: list, rnd: int,
               attempt: int) -> dict[str, Any]:
    """Sample the cohort, train the clients that report on the workers, aggregate
    on the server.

    Nothing changes on the server until every worker has reported, so a round
    that fails because a worker died can simply be run again."""
    plan = ray.get(server.plan.remote(rnd))
    weights_ref = server.global_weights.remote()
    params_ref = server.client_params.remote()
    if cfg.secagg.protocol == "none" or not plan.sampled.size:  # (Poisson: maybe nobody)
        shards = np.array_split(plan.reporting, len(workers))
        reports = [w.train_round.remote(rnd, weights_ref, params_ref, shard, None, attempt)
                   for w, shard in zip(workers, shards) if len(shard)]
        out = ray.get(server.apply.remote(rnd, len(plan.sampled), *reports))
    else:
        out = _secure_round(ray, server, workers, plan, rnd, weights_ref, params_ref, attempt)
    out.update(plan.counts())
    return out


def _replace_dead_workers(ray: Any, workers: list, start: Any) -> list[int]:
    """Restart (in place) the worker actors that no longer answer; their indices."""
    dead = []
    for i, w in enumerate(workers):
        try:
            ray.get(w.ping.remote(), timeout=120)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            workers[i] = start(i)
            dead.append(i)
    ray.get([workers[i].ping.remote() for i in dead])
    return dead


def _per_worker(method: Any, n: int, *args: Any) -> list:
    """Call a server method that answers with one message per worker; returns
    ``n`` object refs (Ray's ``num_returns``) to hand straight to the workers."""
    refs = method.options(num_returns=n).remote(*args)
    return [refs] if n == 1 else list(refs)


def _secure_round(ray: Any, server: Any, workers: list, plan: Any, rnd: int,
                  weights_ref: Any, params_ref: Any, attempt: int = 0) -> dict[str, Any]:
    """One round under secure aggregation: the protocol's four message rounds
    between the worker actors (on behalf of their clients) and the server actor.

    The server splits the cohort into the workers' shards. Every sampled
    client joins the key exchange; only the reporting ones (``plan.reporting``)
    mask, the others drop out before masking. The messages then go from actor
    to actor as object refs, all submitted at once, and the driver waits only
    for the round's result: each worker advertises keys, shares them, trains
    (while the server routes the shares), masks and unmasks."""
    layout, shards = ray.get(server.secagg_begin.remote(rnd, plan.sampled, len(workers)))
    active = [(w, np.asarray(s, np.int64)) for w, s in zip(workers, shards) if len(s)]
    n = len(active)
    adverts = [w.secagg_advertise.remote(rnd, s) for w, s in active]
    setups = _per_worker(server.secagg_keys, n, *adverts)
    shares = [w.secagg_share_keys.remote(setups[i]) for i, (w, _) in enumerate(active)]
    deliveries = _per_worker(server.secagg_route, n, *shares)
    reports = []
    for i, (w, shard) in enumerate(active):
        ids = np.intersect1d(shard, plan.reporting)
        if len(ids):
            w.train_round.remote(rnd, weights_ref, params_ref, ids, layout, attempt)
            reports.append(w.secagg_mask.remote(deliveries[i]))
    requests = _per_worker(server.secagg_collect, n, rnd, *reports)
    responses = [w.secagg_unmask.remote(requests[i]) for i, (w, _) in enumerate(active)]
    return ray.get(server.secagg_finish.remote(rnd, len(plan.sampled), *responses))


def _memory_row(ray: Any, server: Any, workers: list) -> dict[str, float]:
    """Resident memory now (MiB) of the driver, the server actor and all workers."""
    server_mem, *worker_mem = ray.get([server.memory.remote()]
                                      + [w.memory.remote() for w in workers])
    return {"mem_driver_mib": memory_mib()["rss"], "mem_server_mib": server_mem["rss"],
            "mem_workers_mib": sum(m["rss"] for m in worker_mem)}


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


def _worst_round_event(cfg: SimConfig, dim: int) -> Any:
    """The mechanism event of the least noisy round that can still complete (what a
    budget stop must check): under distributed_skellam the sum with the fewest
    noise shares (:func:`fedsim.privacy.skellam.worst_noise_shares`)."""
    shares = None
    if cfg.dp.mechanism == "distributed_skellam":
        from fedsim.privacy.skellam import worst_noise_shares

        shares = worst_noise_shares(cfg)
    return mechanism_event(cfg.dp, cfg.clients_per_round, dim, cfg.secagg.precision_bits,
                           noise_shares=shares)


def _model_size(cfg: SimConfig, data: FederatedData) -> int:
    """The number of trainable parameters (builds the model here, in the driver)."""
    from fedsim.models.keras import build_model, count_parameters

    return count_parameters(build_model(cfg.model, data.input_shape, data.num_classes, cfg.seed))


def _calibrated(cfg: SimConfig, data: FederatedData, resumed: Optional[dict[str, Any]]
                ) -> tuple[SimConfig, dict[str, Any], bool]:
    """``cfg`` with the noise that spends ``dp.target_epsilon`` over the whole run.

    A resumed run keeps the checkpoint's calibrated noise when its ledger plus the
    rounds left still meet the target (the same run continued: bit-identical);
    otherwise (e.g. more ``rounds``) the rounds left are calibrated so that the
    ledger plus them spend the target. Returns the config, what the summary
    records, and whether the noise changed on resume.
    """
    dim = _model_size(cfg, data) if cfg.secagg.protocol != "none" else None
    ledger = resumed["ledger"] if resumed else []
    done = resumed["round"] if resumed else 0
    if resumed:
        saved = dict(resumed["config"]["dp"])
        same = {**saved, "noise_multiplier": cfg.dp.noise_multiplier,
                "epsilon": cfg.dp.epsilon} == dataclasses.asdict(cfg.dp)
        if same and done < cfg.rounds:
            kept = dataclasses.replace(cfg, dp=DPConfig(**saved))
            acct = build_accountant(kept, dim)
            acct.restore(ledger)
            event = acct.round_event(mechanism_event(kept.dp, kept.clients_per_round))
            if acct.epsilon_after(event, cfg.rounds - done) <= cfg.dp.target_epsilon:
                return kept, {"noise_multiplier": kept.dp.noise_multiplier,
                              "epsilon_per_round": kept.dp.epsilon,
                              "from_checkpoint": True}, False
    dp = calibrate(cfg, ledger, done, dim)
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
                   actors: Optional[fedsim.engine.warm.WarmActors] = None) -> SimulationResult:
    """Run a whole federated simulation and write its outputs to ``output_dir``.

    Bad configuration and unreadable data raise :class:`FedsimError` before any
    output file is written. Uses the running Ray instance if there is one,
    otherwise starts (and afterwards stops) one as ``cfg.ray`` says.

    ``actors``: a :class:`fedsim.engine.warm.WarmActors` to take the server and
    worker actors from (reset for this run, started if missing) and to give them
    back to afterwards, alive; None starts new actors and stops them at the end.
    The results are the same either way.
    """
    t_start = time.perf_counter()
    data = load_federated_data(cfg.data, cfg.clients, cfg.seed)
    check_compatible(cfg, data)
    privacy: dict[str, Any] = {}
    resumed: Optional[dict[str, Any]] = None
    kept: list[dict[str, Any]] = []
    if cfg.resume is not None:
        resumed = load_checkpoint(Path(cfg.resume))
    fresh_aggregator = False  # the noise changed on resume: the aggregator starts afresh
    if cfg.dp.mechanism != "none" and cfg.dp.target_epsilon is not None:
        cfg, privacy["calibrated"], fresh_aggregator = _calibrated(cfg, data, resumed)
    if resumed is not None:
        saved = resumed["config"]
        if fresh_aggregator:  # recalibrated for the same target: not a change of budget
            saved = {**saved, "dp": {**saved["dp"], "noise_multiplier": cfg.dp.noise_multiplier,
                                     "epsilon": cfg.dp.epsilon}}
        privacy["changes_on_resume"] = check_resumable(saved, cfg)
        fresh_aggregator = fresh_aggregator or "dp" in privacy["changes_on_resume"]
        if cfg.dp.mechanism != "none" or cfg.aggregator.kind == "tff":
            check_ledger(cfg, resumed["ledger"], resumed["config"])
        output_dir = cfg.resume
        kept = _kept_rows(Path(cfg.resume), resumed["round"])
    out = _prepare_output(Path(output_dir) if output_dir is not None else None,
                          resuming=resumed is not None)

    accountant = None
    actor_cfg = actor_config(cfg)
    started = connect_ray(cfg.ray)
    import ray

    from fedsim.engine.server import Server
    from fedsim.engine.worker import make_pool, make_worker, pool_size

    metrics = MetricsLog(out / "metrics.jsonl", kept) if out else None
    board = TensorBoardLog(out / "tb") if out and cfg.tensorboard else None
    rows: list[dict[str, Any]] = list(kept)
    first_round = resumed["round"] + 1 if resumed else 1
    stop_reason = f"reached rounds={cfg.rounds}"
    progress: Optional[Progress] = None
    pool = server = None
    try:
        data_ref = ray.put(data.train)
        resources = ray.cluster_resources()
        n_workers = pool_size(cfg, resources.get("CPU", 1.0), resources.get("GPU", 0.0))
        if actors is None:
            server = ray.remote(num_cpus=0)(Server).remote(
                actor_cfg, data.input_shape, data.num_classes, data.x_test, data.y_test)
            pool = make_pool(actor_cfg, data_ref, data.input_shape, data.num_classes, n_workers)
        else:
            server, pool = actors.acquire(actor_cfg, data_ref, data.input_shape,
                                          data.num_classes, data.x_test, data.y_test, n_workers)
        workers = pool.actors
        num_parameters = ray.get(server.num_parameters.remote())
        # A TFF factory may report DpEvents of its own: they are accounted too.
        accountant = (build_accountant(cfg, num_parameters)
                      if cfg.dp.mechanism != "none" or cfg.aggregator.kind == "tff" else None)
        if resumed:
            if accountant:
                accountant.restore(resumed["ledger"], resumed["config"].get("sampling"),
                                   resumed["config"]["dp"].get("accountant"))
            # Changed DP parameters (resume_force, or a recalibrated noise) start the
            # aggregator afresh: its state carries the old ones (noise stddev, clip).
            ray.get(server.set_state.remote(resumed["server"], not fresh_aggregator))
        placement = ray.get([w.where.remote() for w in workers])
        setup_seconds = time.perf_counter() - t_start
        next_event = (accountant.round_event(_worst_round_event(cfg, num_parameters))
                      if accountant else None)
        progress = Progress(cfg.rounds - first_round + 1, cfg.progress)

        def checkpoint(rnd: int) -> None:
            save_checkpoint(out, {
                "round": rnd, "config": asdict(cfg), "server": ray.get(server.get_state.remote()),
                "ledger": accountant.ledger if accountant else []})

        for rnd in range(first_round, cfg.rounds + 1):
            if accountant and cfg.dp.max_epsilon is not None:
                eps_next = accountant.epsilon_after(next_event)
                if eps_next > cfg.dp.max_epsilon:
                    stop_reason = (f"privacy budget: round {rnd} would raise epsilon to "
                                   f"{eps_next:.4g} > dp.max_epsilon={cfg.dp.max_epsilon:g}")
                    break
            t0 = time.perf_counter()
            row: dict[str, Any] = {"round": rnd}
            for attempt in range(cfg.faults.max_retries + 1):
                try:
                    row.update(_run_round(ray, cfg, server, workers, rnd, attempt))
                    break
                except ray.exceptions.RayError as err:
                    dead = _replace_dead_workers(ray, workers, lambda i: make_worker(
                        actor_cfg, data_ref, data.input_shape, data.num_classes, i, pool))
                    if not dead:
                        raise
                    if attempt == cfg.faults.max_retries:
                        if out:
                            checkpoint(rnd - 1)
                        raise FedsimError(
                            f"round {rnd}: worker actors died {attempt + 1} times (faults."
                            f"max_retries={cfg.faults.max_retries}; last: {type(err).__name__})"
                            + (f"; continue with resume={out}" if out else "")) from err
            row["retries"] = attempt
            if accountant and "dp_event" in row:
                accountant.record(accountant.round_event(row.pop("dp_event")))
            if accountant and (accountant.ledger or cfg.dp.mechanism != "none"):
                row.update(epsilon=accountant.epsilon(), delta=accountant.delta)
            row["round_seconds"] = time.perf_counter() - t0
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                t1 = time.perf_counter()
                row.update(ray.get(server.evaluate.remote()))
                row["eval_seconds"] = time.perf_counter() - t1
            else:
                row.update(eval_loss=None, eval_accuracy=None)
            if cfg.memory_every and rnd % cfg.memory_every == 0:
                row.update(_memory_row(ray, server, workers))
            rows.append(row)
            if board:
                board.write(row)
            if metrics:
                metrics.write(row)
                if cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0:
                    checkpoint(rnd)
            progress.update(row)
        if out:
            checkpoint(rows[-1]["round"] if rows else 0)
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
                  "workers": ray.get([w.memory.remote() for w in workers])}
    finally:
        failed = sys.exc_info()[0] is not None
        if server is not None and ray.is_initialized():
            try:  # stops e.g. a TFF aggregator's worker_binary child
                ray.get(server.close.remote(), timeout=15)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                # gone already, or stuck: the kill below ends it (and TFF's
                # watchdogs then stop its worker_binary); never reused
                failed = True
            if actors is None:
                ray.kill(server)  # now, not whenever the handle is collected
        if progress:
            progress.close()
        if actors is not None and ray.is_initialized():
            actors.release(server, pool, failed=failed)  # kept alive, unless it failed
        elif pool is not None and pool.placement_group is not None and ray.is_initialized():
            ray.util.remove_placement_group(pool.placement_group)
        if metrics:
            metrics.close()
        if board:
            board.close()
        if started:
            ray.shutdown()

    evaluated = [r for r in rows if r.get("eval_accuracy") is not None]
    final = evaluated[-1] if evaluated else {}
    summary = {
        "status": "completed",
        "stop_reason": stop_reason,
        "rounds_completed": len(rows),
        "resumed_from_round": resumed["round"] if resumed else None,
        "final": {k: final.get(k) for k in ("round", "eval_accuracy", "eval_loss")},
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "best_eval_accuracy": max((r["eval_accuracy"] for r in evaluated), default=None),
        "wall_seconds": time.perf_counter() - t_start,
        "setup_seconds": setup_seconds,
        "mean_round_seconds": float(np.mean([r["round_seconds"] for r in rows])),
        "privacy": privacy_summary(cfg, accountant, privacy),
        "audit": audit,
        "workers": n_workers,
        "worker_nodes": len({p["node"] for p in placement}),
        "worker_placement": placement,
        "memory_mib": memory,
        "num_parameters": num_parameters,
        "data": {"name": data.name, "num_classes": data.num_classes,
                 "input_shape": list(data.input_shape), "test_examples": int(len(data.y_test))},
        "config": asdict(cfg),
        "versions": versions(),
    }
    if out:
        plot_metrics(rows, out / "metrics.png", audit_epsilon=audit and audit["epsilon"],
                     title=f"{cfg.model.name} on {data.name}, {cfg.clients} clients, "
                           f"{cfg.clients_per_round}/round, dp={cfg.dp.mechanism}")
        write_json_atomic(out / "summary.json", summary)
    return SimulationResult(rows, summary, out, final_weights)

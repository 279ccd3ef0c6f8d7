"""One round on the actors: the cohort's plan, training on the workers, the
aggregate on the server (in the clear or through the secure-sum protocol), and
the replacement of worker actors that died."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fedsim.config import SimConfig
from fedsim.errors import FedsimError
from fedsim.results.client_metrics import client_rows, summarize_clients
from fedsim.results.outputs import memory_mib
from fedsim.rng import STREAM_EVAL_CLIENTS, stream


def run_round(ray: Any, cfg: SimConfig, server: Any, workers: list, rnd: int,
               attempt: int) -> dict[str, Any]:
    """Sample the cohort, train the clients that report on the workers, aggregate
    on the server.

    Nothing changes on the server until every worker has reported, so a round
    that fails because a worker died can simply be run again."""
    # All three asked at once (the server answers them in this order), so the
    # weights are ready while the plan travels back to the driver.
    plan_ref = server.plan.remote(rnd)
    weights_ref = server.global_weights.remote()
    params_ref = server.client_params.remote()
    plan = ray.get(plan_ref)
    if cfg.secagg.protocol == "none" or not plan.sampled.size:  # (Poisson: maybe nobody)
        shards = np.array_split(plan.reporting, len(workers))
        reports = [w.train_round.remote(rnd, weights_ref, params_ref, shard, None, attempt)
                   for w, shard in zip(workers, shards) if len(shard)]
        out = ray.get(server.apply.remote(rnd, len(plan.sampled), *reports))
    else:
        out = secure_round(ray, server, workers, plan, rnd, weights_ref, params_ref, attempt)
    out.update(plan.counts())
    return out


def replace_dead_workers(ray: Any, workers: list, start: Any) -> list[int]:
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


def per_worker(method: Any, n: int, *args: Any) -> list:
    """Call a server method that answers with one message per worker; returns
    ``n`` object refs (Ray's ``num_returns``) to hand straight to the workers."""
    refs = method.options(num_returns=n).remote(*args)
    return [refs] if n == 1 else list(refs)


def secure_round(ray: Any, server: Any, workers: list, plan: Any, rnd: int,
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
    setups = per_worker(server.secagg_keys, n, *adverts)
    shares = [w.secagg_share_keys.remote(setups[i]) for i, (w, _) in enumerate(active)]
    deliveries = per_worker(server.secagg_route, n, *shares)
    reports = []
    for i, (w, shard) in enumerate(active):
        ids = np.intersect1d(shard, plan.reporting)
        if len(ids):
            w.train_round.remote(rnd, weights_ref, params_ref, ids, layout, attempt)
            reports.append(w.secagg_mask.remote(deliveries[i]))
    requests = per_worker(server.secagg_collect, n, rnd, *reports)
    responses = [w.secagg_unmask.remote(requests[i]) for i, (w, _) in enumerate(active)]
    return ray.get(server.secagg_finish.remote(rnd, len(plan.sampled), *responses))


def evaluation_clients(cfg: SimConfig, rnd: int) -> np.ndarray:
    """The clients federated evaluation visits after round ``rnd`` (sorted):
    ``federated_eval.clients`` of the population, drawn without replacement
    from the stream ``(seed, EVAL_CLIENTS, round)``, or all of them."""
    n = cfg.federated_eval.clients
    if n == "all" or n >= cfg.clients:
        return np.arange(cfg.clients)
    rng = stream(cfg.seed, STREAM_EVAL_CLIENTS, rnd)
    return np.sort(rng.choice(cfg.clients, size=int(n), replace=False))


def federated_evaluation(ray: Any, cfg: SimConfig, server: Any, workers: list, rnd: int
                         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate the global model on the clients' own test data, in the workers
    (one contiguous shard of :func:`evaluation_clients` each). Returns the
    row's ``fed_*`` (and with personalization ``pers_*``) keys
    (:func:`fedsim.results.client_metrics.summarize_clients`) and one row per
    client for ``client_eval.jsonl``."""
    ids = evaluation_clients(cfg, rnd)
    weights_ref = server.global_weights.remote()
    results = ray.get([w.evaluate_clients.remote(rnd, weights_ref, shard)
                       for w, shard in zip(workers, np.array_split(ids, len(workers)))
                       if len(shard)])
    plain = [e for r in results for e in r[0]]
    personalized = [e for r in results for e in r[1]]
    row = summarize_clients(plain, "fed")
    per_client = client_rows(rnd, plain, "fed")
    if cfg.federated_eval.personalization_steps > 0:
        row.update(summarize_clients(personalized, "pers"))
        per_client += client_rows(rnd, personalized, "pers")
    return row, per_client


def memory_row(ray: Any, server: Any, workers: list) -> dict[str, float]:
    """Resident memory now (MiB) of the driver, the server actor and all workers."""
    server_mem, *worker_mem = ray.get([server.memory.remote()]
                                      + [w.memory.remote() for w in workers])
    return {"mem_driver_mib": memory_mib()["rss"], "mem_server_mib": server_mem["rss"],
            "mem_workers_mib": sum(m["rss"] for m in worker_mem)}


class RoundFailed(FedsimError):
    """A round's worker actors died more often than ``faults.max_retries`` allows."""


def run_round_with_retries(ray: Any, cfg: SimConfig, server: Any, workers: list, rnd: int,
                           restart: Callable[[int], Any]) -> dict[str, Any]:
    """Run round ``rnd``; when worker actors die, restart them in place
    (``restart(i)`` starts worker i) and run the round again, up to
    ``faults.max_retries`` times. The row holds ``round``, the round's
    measurements and ``retries``. Raises :class:`RoundFailed` past the bound, and
    re-raises a Ray error that killed no worker."""
    row: dict[str, Any] = {"round": rnd}
    for attempt in range(cfg.faults.max_retries + 1):
        try:
            row.update(run_round(ray, cfg, server, workers, rnd, attempt))
            break
        except ray.exceptions.RayError as err:
            if not replace_dead_workers(ray, workers, restart):
                raise
            if attempt == cfg.faults.max_retries:
                raise RoundFailed(
                    f"round {rnd}: worker actors died {attempt + 1} times (faults."
                    f"max_retries={cfg.faults.max_retries}; last: {type(err).__name__})") from err
    row["retries"] = attempt
    return row

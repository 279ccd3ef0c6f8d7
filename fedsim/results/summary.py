"""What a run's summary says about privacy: the accountant's spend and the
assumptions it rests on, and the example-level DP of DP-SGD clients."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from fedsim.config import SimConfig
from fedsim.data.base import FederatedData
from fedsim.privacy.mechanisms.base import resolve_mechanism
from fedsim.privacy.noise import GAUSSIAN_SAMPLER

TFF_SAMPLER = "the aggregation factory's own (TensorFlow)"

NOT_PRIVATIZED = ("per-round metrics computed on the clients' exact data and released "
                  "without noise: train_loss, num_examples, clients, clipped_fraction, "
                  "zeroed, dropped, stragglers (and the evaluation on the central test split)")


def sampling_summary(cfg: SimConfig, rounds: Optional[int] = None) -> dict[str, Any]:
    """The run's participation scheme: ``scheme`` and ``min_sep`` (the config's),
    ``rounds_per_epoch`` (epochs only) and ``max_participations``, the most
    rounds any one client can take part in among rounds ``1..rounds`` (default
    ``cfg.rounds``; None for uniform and poisson: any round;
    :mod:`fedsim.cohort.sampling`)."""
    from fedsim.cohort.sampling import max_participations, rounds_per_epoch

    s = cfg.sampling
    out: dict[str, Any] = {"scheme": s.scheme, "min_sep": s.min_sep}
    if s.scheme == "epochs":
        out["rounds_per_epoch"] = rounds_per_epoch(cfg.clients, cfg.clients_per_round)
    rounds = cfg.rounds if rounds is None else rounds
    out["max_participations"] = max_participations(s.scheme, rounds, cfg.clients,
                                                   cfg.clients_per_round, s.min_sep)
    return out


def encoded_run_event(accountant: Any) -> Any:
    """The DpEvent of the whole run, whose epsilon (under ``accountant.relation``)
    is the run's: ``epochs``/``min_sep``: the most participating client's
    (:meth:`~fedsim.privacy.accounting.PrivacyAccountant.stream_event`);
    otherwise the composition of the ledger. Encoded as checkpoints encode
    events (``{"$dp_event": "GaussianDpEvent", ...}``,
    :mod:`fedsim.results.checkpoint`); None without a ledger."""
    import dp_accounting

    from fedsim.results.checkpoint import CheckpointError, encode_state

    if not accountant.ledger:
        return None
    if accountant.unamplified:
        event = accountant.stream_event(accountant.ledger)
    else:
        parts = [dp_accounting.SelfComposedDpEvent(e, int(c)) for e, c in accountant.ledger]
        event = parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)
    try:
        payload, arrays = encode_state(event)
    except CheckpointError:
        return None
    return payload if not arrays else None


def privacy_summary(cfg: SimConfig, accountant: Any, extra: dict[str, Any],
                    mechanism: Any = None, rounds: Optional[int] = None) -> dict[str, Any]:
    """What the run spent, and the assumptions the number rests on (``rounds``:
    the last round run, for :func:`sampling_summary`; default ``cfg.rounds``)."""
    if accountant is None or (cfg.dp.mechanism == "none" and not accountant.ledger):
        return {"mechanism": "none", "epsilon": None, **extra}
    name = (cfg.dp.mechanism if cfg.dp.mechanism != "none"
            else f"tff:{cfg.aggregator.factory}")  # the TFF factory's own events
    eps = accountant.epsilon()
    out = {"mechanism": name, "epsilon": eps if np.isfinite(eps) else "inf",
           "delta": accountant.delta, "accountant": accountant.kind,
           "neighboring_relation": accountant.relation.name,
           "sampling": sampling_summary(cfg, rounds),
           "noise_multiplier": cfg.dp.noise_multiplier,
           "rounds_accounted": sum(c for _, c in accountant.ledger),
           # epochs/min_sep: the event the epsilon is of (the most participating client)
           "run_event": (str(accountant.stream_event(accountant.ledger))
                         if accountant.unamplified and accountant.ledger else None),
           "noise_sampler": (TFF_SAMPLER if cfg.aggregator.kind == "tff" else resolve_mechanism(
               mechanism if mechanism is not None else cfg.dp.mechanism).noise_sampler(cfg.dp)),
           "noise_seed": cfg.dp.noise_seed,
           "secure_rounding_charged": (
               dict(zip(("model_size", "precision_bits"), accountant.secure_rounding))
               if accountant.secure_rounding else None),
           "not_privatized": NOT_PRIVATIZED,
           "ledger": [{"event": repr(e), "count": c} for e, c in accountant.ledger],
           # the whole run as one DpEvent, machine-readable (fedsim.privacy.tuning reads it)
           "event": encoded_run_event(accountant)}
    out.update(extra)
    return out


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
    from fedsim.client.dp_sgd import (
        ASSUMPTIONS,
        client_example_epsilon,
        microbatch_size,
        round_steps,
    )

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
            "adjacency": "add or remove one example", "noise_sampler": GAUSSIAN_SAMPLER,
            "noise_seed": cfg.dp.noise_seed}


def run_summary(cfg: SimConfig, data: FederatedData, rows: list[dict[str, Any]], accountant: Any,
                privacy: dict[str, Any], audit: Any, mechanism: Any, *, started: float,
                setup_seconds: float, stop_reason: str, resumed_from: Any, workers: int,
                placement: list[dict[str, str]], memory: dict[str, Any],
                num_parameters: int, model: str = "", task: Any = None) -> dict[str, Any]:
    """``summary.json``: how the run ended, its final and best results, timings
    (seconds, ``started`` on ``time.perf_counter``'s clock), privacy, audit,
    where the workers ran, memory (MiB), the data, the config and the versions."""
    import time
    from dataclasses import asdict

    from fedsim.results.outputs import versions

    name, higher = ((task.primary_metric, task.higher_is_better) if task is not None
                    else ("accuracy", True))
    primary = f"eval_{name}"
    evaluated = [r for r in rows if r.get("eval_loss") is not None]
    final = evaluated[-1] if evaluated else {}
    scores = [r[primary] for r in evaluated if r.get(primary) is not None]
    last_round = rows[-1]["round"] if rows else 0
    return {
        "status": "completed",
        "stop_reason": stop_reason,
        "rounds_completed": len(rows),
        "resumed_from_round": resumed_from,
        # the last evaluation: central (eval_*), federated (fed_*), personalized (pers_*)
        "final": {**{k: final.get(k) for k in ("round", "eval_accuracy", "eval_loss")},
                  **{k: v for k, v in final.items() if k.startswith(("eval_", "fed_", "pers_"))
                     and not k.endswith("_seconds")}},
        "final_train_loss": rows[-1]["train_loss"] if rows else None,
        "best_eval_accuracy": max((r["eval_accuracy"] for r in evaluated
                                   if r.get("eval_accuracy") is not None), default=None),
        "task": getattr(task, "name", "classification"),
        "primary_metric": primary,  # the number the task is judged by
        "best": {primary: (max if higher else min)(scores) if scores else None},
        "wall_seconds": time.perf_counter() - started,
        "setup_seconds": setup_seconds,
        "mean_round_seconds": float(np.mean([r["round_seconds"] for r in rows])),
        "sampling": sampling_summary(cfg, last_round),  # who took part, in rounds 1..last
        "privacy": privacy_summary(cfg, accountant, privacy, mechanism, last_round),
        "audit": audit,
        "workers": workers,
        "worker_nodes": len({p["node"] for p in placement}),
        "worker_placement": placement,
        "memory_mib": memory,
        "model": model,  # what trained: the built-in's name, or the user's model's
        "num_parameters": num_parameters,
        "data": {"name": data.name, "num_classes": data.num_classes,
                 "input_shape": list(data.input_shape), "test_examples": int(len(data.y_test))},
        "config": asdict(cfg),
        "versions": versions(),
    }

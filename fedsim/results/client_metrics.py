"""Per-client evaluation results as the metrics row reports them: the
example-weighted value, the unweighted mean over clients, and percentiles
across clients (the fairness view of federated evaluation)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np

#: Percentiles across clients that every federated-evaluation metric reports.
PERCENTILES = (10, 50, 90)


def _loss_den(e: Any) -> float:
    return e.num_examples if e.loss_den is None else e.loss_den


def _ratios(e: Any) -> dict[str, Optional[float]]:
    """One client's values: ``loss`` (its mean loss per example, or per counted
    token for a ratio loss) and each metric's numerator over its denominator;
    None where nothing was counted."""
    parts = {"loss": (e.loss_sum, _loss_den(e)), **e.metrics}
    return {name: num / den if den > 0 else None for name, (num, den) in parts.items()}


def client_values(evals: Sequence[Any]) -> dict[str, np.ndarray]:
    """name -> one value per client (:func:`_ratios`). Clients without a single
    counted example of a metric (denominator 0) are left out of that metric."""
    values: dict[str, list[float]] = {"loss": []}
    for e in evals:
        for name, value in _ratios(e).items():
            if value is not None:
                values.setdefault(name, []).append(value)
    return {k: np.asarray(v, np.float64) for k, v in values.items()}


def summarize_clients(evals: Iterable[Any], prefix: str) -> dict[str, Any]:
    """The row keys for the clients' evaluations ``evals`` (each a
    :class:`fedsim.client.evaluation.ClientEval`; clients without test
    examples are skipped).

    For the loss and each metric ``m``: ``<prefix>_m`` (weighted: the sum of
    numerators over the sum of denominators, for the loss the mean over all
    examples), ``<prefix>_m_mean`` (unweighted mean of the clients' values)
    and ``<prefix>_m_p10``/``_p50``/``_p90`` (numpy's linear-interpolation
    percentiles of the clients' values). ``<prefix>_clients``: clients
    evaluated; ``<prefix>_examples``: their test examples."""
    evals = [e for e in evals if e.num_examples > 0]
    row: dict[str, Any] = {f"{prefix}_clients": len(evals),
                           f"{prefix}_examples": int(sum(e.num_examples for e in evals))}
    if not evals:
        return row
    totals = {"loss": (sum(e.loss_sum for e in evals), sum(_loss_den(e) for e in evals))}
    for name in evals[0].metrics:
        totals[name] = (sum(e.metrics[name][0] for e in evals),
                        sum(e.metrics[name][1] for e in evals))
    per_client = client_values(evals)
    for name, (num, den) in totals.items():
        row[f"{prefix}_{name}"] = num / den if den > 0 else None
        values = per_client.get(name, np.zeros(0))
        if values.size:
            row[f"{prefix}_{name}_mean"] = float(values.mean())
            for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
                row[f"{prefix}_{name}_p{q}"] = float(v)
    return row


def client_rows(round_num: int, evals: Iterable[Any], prefix: str) -> list[dict[str, Any]]:
    """One JSON row per evaluated client (``client_eval.jsonl``: the per-client
    view): round, kind (``fed``/``pers``), client, examples, loss and metrics."""
    rows = []
    for e in evals:
        if e.num_examples == 0:
            continue
        rows.append({"round": round_num, "kind": prefix, "client": e.cid,
                     "examples": e.num_examples, **_ratios(e)})
    return rows

"""Round time with and without secure aggregation, side by side in one run.

A ~108k-parameter MLP (60 -> 1500 -> 10) on LEAF synthetic data, 2,000
clients, dp=gaussian, 1 local epoch at batch 20, 2 worker actors; for each
cohort size the same simulation runs without secure aggregation and with each
protocol variant:

- ``secagg_plus`` / ``secagg``: as fedsim runs them by default
  (``secagg.skip_cancelling_masks=true``: a worker skips the pairwise masks
  between its own clients, which cancel in the sum it sends, and SecAgg+ puts
  ring neighbours on the same worker; the server's messages are the same);
- ``secagg_plus:full`` / ``secagg:full``: every client computes all of its
  masks, as a deployed client would (the protocol's full client-side cost).

All variants run in one Ray instance, in turn, ``--repeats`` times (the order
alternating), so that the machine's drift hits them alike. A variant's time
is the median over its rounds after the first (which includes tracing) and
over repeats; the ratio is to the plain round. Also printed: the median
seconds the protocol's steps took in the slowest worker plus the server
(``secagg_seconds``). Full SecAgg is quadratic in the cohort: it is skipped
above --max-full-secagg clients.

``--vectorize`` sets ``client.vectorize`` for every variant (``auto``, the
default, or a number; 0 trains one client at a time).

    uv run python benchmarks/secagg_round_time.py [--cohorts 10 100 1000] [--rounds 6]
        [--vectorize 0]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = ("secagg_plus", "secagg_plus:full", "secagg", "secagg:full")


def vectorize_option(text: str) -> str | int:
    """``--vectorize``: ``auto`` or a number of clients per call (argparse's type)."""
    return text if text == "auto" else int(text)


def round_times(cohort: int, variant: str, rounds: int, vectorize: str | int = "auto",
                ) -> tuple[list[float], list[float]]:
    """Per-round seconds (after the first round) and protocol seconds of one run
    (``vectorize``: client.vectorize, ``auto`` or a number of clients per call)."""
    from fedsim.config import (
        ClientConfig,
        DataConfig,
        DPConfig,
        ModelConfig,
        RayConfig,
        SecAggConfig,
        ServerConfig,
        SimConfig,
    )
    from fedsim.simulation import run_simulation

    protocol, _, full = variant.partition(":")
    cfg = SimConfig(clients=2000, clients_per_round=cohort, rounds=rounds, local_epochs=1,
                    batch_size=20, progress=False, eval_every=rounds,
                    data=DataConfig(name="synthetic", test_clients=20),
                    model=ModelConfig(name="mlp", hidden=[1500]),
                    server=ServerConfig(weighting="uniform"),
                    client=ClientConfig(vectorize=vectorize),
                    dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0, l2_norm_clip=1.0),
                    secagg=SecAggConfig(protocol=protocol, skip_cancelling_masks=not full),
                    ray=RayConfig(num_cpus=2, workers=2))
    rows = run_simulation(cfg).metrics[1:]
    return [r["round_seconds"] for r in rows], [r.get("secagg_seconds", 0.0) for r in rows]


def wait_idle(ray, timeout_s: float = 60.0) -> None:
    """Until the previous run's actors are gone (their CPUs back), so that a
    dying run does not slow the next one down."""
    import time

    total = ray.cluster_resources().get("CPU", 0.0)
    end = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-full-secagg", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=["secagg_plus", "secagg_plus:full",
                                                      "secagg"], choices=VARIANTS)
    ap.add_argument("--vectorize", default="auto", type=vectorize_option,
                    help="client.vectorize for every variant: auto (the default) or a number "
                         "(0: one client at a time)")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{'cohort':>7} {'variant':>17} {'s/round':>9} {'protocol s':>11} "
          f"{'ratio to plain':>15}")
    for cohort in args.cohorts:
        variants = ["none"] + [v for v in args.variants
                               if not (v.startswith("secagg:") or v == "secagg")
                               or cohort <= args.max_full_secagg]
        times: dict[str, list[float]] = {v: [] for v in variants}
        proto: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for v in (variants if rep % 2 == 0 else variants[::-1]):
                t, p = round_times(cohort, v, args.rounds, args.vectorize)
                wait_idle(ray)
                times[v] += t
                proto[v] += p
                print(f"  (repeat {rep + 1}: {v} median {statistics.median(t):.3f} s/round)",
                      flush=True)
        plain = statistics.median(times["none"])
        for v in variants:
            t = statistics.median(times[v])
            print(f"{cohort:>7} {v:>17} {t:>9.3f} {statistics.median(proto[v]):>11.3f} "
                  f"{t / plain:>15.2f}", flush=True)
        skipped = [v for v in args.variants if v not in variants]
        if skipped:
            print(f"{cohort:>7} {', '.join(skipped)}: skipped (quadratic; --max-full-secagg)")
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Memory against population size: the same simulation at 1,000, 100,000,
1,000,000 and 10,000,000 clients, 10 (``--per-round``) clients per round, on LEAF
synthetic data (generated per client on demand, so the data itself does not
grow with the population), under every sampling scheme (``--sampling``:
uniform, poisson, epochs, min_sep with ``--min-sep`` groups).

Prints, per scheme and population, the peak resident memory (MiB) of the
server actor and of the worker actors, the driver's current RSS, each total's
ratio to the smallest population's (flat memory means ratios close to 1.0;
the target is at most ``--target`` at the largest population) and the median
seconds per round (rounds after the first, evaluation excluded).

With ``--algorithm scaffold`` every client's control variate lives in the
on-disk store (:mod:`fedsim.client.state`), written into a temporary directory
that is removed afterwards; the table then also shows the disk space the store
takes (``summary["memory_mib"]["client_state_disk_mib"]``: the allocated blocks
of its sparse shard files, so only the clients that trained count).

    uv run python benchmarks/population_memory.py [--rounds 5] [--per-round 100]
        [--populations 1000 100000 1000000 10000000] [--sampling uniform poisson epochs min_sep]
        [--algorithm fedavg|scaffold] [--check-resume]

``--check-resume``: at the largest population, a run that dies after a round's
client states were committed but before its checkpoint resumes bit-identically
to an uninterrupted one (weights, algorithm state, metrics, every shard file).
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _config(population: int, rounds: int, per_round: int, algorithm: str,
            state_dir: str | None = None, sampling: str = "uniform",
            min_sep: int | None = None) -> object:
    from fedsim.config import (
        AlgorithmConfig,
        DataConfig,
        ModelConfig,
        RayConfig,
        SamplingConfig,
        ServerConfig,
        SimConfig,
    )

    extra = {}
    if algorithm != "fedavg":  # conf/algorithm/scaffold.yaml's uniform weighting
        extra = dict(algorithm=AlgorithmConfig(name=algorithm, state_dir=state_dir),
                     server=ServerConfig(weighting="uniform"))
    return SimConfig(clients=population, clients_per_round=per_round, rounds=rounds,
                     progress=False, local_epochs=1,
                     data=DataConfig(name="synthetic", test_clients=50),
                     model=ModelConfig(name="mlp", hidden=[64]),
                     sampling=SamplingConfig(scheme=sampling,
                                             min_sep=min_sep if sampling == "min_sep" else None),
                     ray=RayConfig(num_cpus=2, workers=2), **extra)


def measure(population: int, rounds: int, per_round: int, algorithm: str = "fedavg",
            sampling: str = "uniform", min_sep: int | None = None) -> dict[str, float]:
    import statistics

    from fedsim.simulation import run_simulation

    with tempfile.TemporaryDirectory(prefix="fedsim-population-state-") as tmp:
        cfg = _config(population, rounds, per_round, algorithm,
                      os.path.join(tmp, "state") if algorithm != "fedavg" else None,
                      sampling, min_sep)
        result = run_simulation(cfg)
    mem = result.summary["memory_mib"]
    out = {"driver": mem["driver"]["rss"], "server": mem["server"]["peak"],
           "workers": sum(w["peak"] for w in mem["workers"]),
           "round_seconds": statistics.median(m["round_seconds"] for m in result.metrics[1:])}
    if "client_state_disk_mib" in mem:
        out["disk"] = mem["client_state_disk_mib"]
    return out


def _equal(a: object, b: object) -> bool:
    """Nested dicts of arrays and numbers, exactly equal."""
    import numpy as np

    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_equal(a[k], b[k]) for k in a))
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def check_resume(population: int, rounds: int, per_round: int, algorithm: str) -> str:
    """Run ``rounds`` rounds uninterrupted; run them again with checkpoints every 2
    rounds and the driver failing (an exception) at the end of the last odd round
    before ``rounds``, after the server committed its client states: the store is
    a round ahead of the checkpoint. Resume that run and compare: final weights,
    the algorithm's state, the metrics (timings aside) and, byte for byte, the
    store's shard files. Returns a one-line verdict."""
    import dataclasses
    import filecmp
    from pathlib import Path

    import numpy as np

    from fedsim.results.callbacks import Callback
    from fedsim.results.checkpoint import load_checkpoint
    from fedsim.simulation import run_simulation

    die_at = rounds - 1 if (rounds - 1) % 2 else rounds - 2
    if die_at < 3:
        return "resume check: needs --rounds >= 4"

    class Dies(Callback):
        def on_round_end(self, ctx: object, row: dict) -> None:
            if row["round"] == die_at:
                raise RuntimeError(f"the driver dies after round {die_at}")

    timings = {"round_seconds", "eval_seconds", "secagg_seconds"}

    def rows(metrics: list) -> list:
        return [{k: v for k, v in r.items() if k not in timings} for r in metrics]

    with tempfile.TemporaryDirectory(prefix="fedsim-population-resume-") as tmp:
        cfg = dataclasses.replace(_config(population, rounds, per_round, algorithm),
                                  checkpoint_every=2)
        reference = run_simulation(cfg, Path(tmp) / "reference")
        died = Path(tmp) / "died"
        try:
            run_simulation(cfg, died, callbacks=[Dies()])
        except RuntimeError:
            pass
        ckpt_round = load_checkpoint(died)["round"]
        resumed = run_simulation(dataclasses.replace(cfg, resume=str(died)))
        same = {"weights": np.array_equal(resumed.weights, reference.weights),
                "metrics": rows(resumed.metrics) == rows(reference.metrics)}
        state, want = (load_checkpoint(d)["server"]["opt_state"] for d in (died, Path(tmp) /
                                                                            "reference"))
        same["algorithm state"] = _equal(load_checkpoint(died)["server"]["opt_state"],
                                         load_checkpoint(Path(tmp) / "reference")["server"]
                                         ["opt_state"])
        if algorithm != "fedavg":
            a, b = (sorted(p.name for p in (d / "client_state" / "shards").iterdir())
                    for d in (died, Path(tmp) / "reference"))
            same["client states"] = a == b and all(
                filecmp.cmp(died / "client_state" / "shards" / n,
                            Path(tmp) / "reference" / "client_state" / "shards" / n,
                            shallow=False) for n in a)
    verdict = "bit-identical" if all(same.values()) else "DIFFERENT"
    return (f"resume check, {population} clients: died after round {die_at} with the "
            f"checkpoint at round {ckpt_round}, resumed to round {rounds}: {verdict} "
            f"({', '.join(f'{k} {v}' for k, v in same.items())})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--populations", type=int, nargs="+",
                    default=[1_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--sampling", nargs="+", default=["uniform", "poisson", "epochs", "min_sep"],
                    choices=["uniform", "poisson", "epochs", "min_sep"])
    ap.add_argument("--min-sep", type=int, default=10,
                    help="sampling.min_sep of the min_sep runs (groups of population / this)")
    ap.add_argument("--target", type=float, default=1.5,
                    help="the largest population's total memory over the smallest's, at most")
    ap.add_argument("--per-round", type=int, default=10, help="clients per round")
    ap.add_argument("--algorithm", default="fedavg", choices=["fedavg", "scaffold"],
                    help="scaffold: client control variates in an on-disk store")
    ap.add_argument("--check-resume", action="store_true",
                    help="also check, at the largest population, that a run that dies "
                         "with its client states a round ahead of its checkpoint resumes "
                         "bit-identically")
    args = ap.parse_args()
    procs = ("driver", "server", "workers")
    # Fresh processes for every run: a peak RSS is a process's high-water mark, so a
    # warm actor would carry the last run's peak into the next.
    failed = []
    for scheme in args.sampling:
        results = {n: measure(n, args.rounds, args.per_round, args.algorithm, scheme,
                              args.min_sep) for n in args.populations}
        first = results[args.populations[0]]
        base = sum(first[k] for k in procs)
        disk = "disk" in first
        extra = f", min_sep {args.min_sep}" if scheme == "min_sep" else ""
        print(f"\n{args.algorithm}, sampling={scheme}{extra}, {args.rounds} rounds of "
              f"{args.per_round} clients")
        print(f"{'clients':>10} {'driver MiB':>11} {'server MiB':>11} {'workers MiB':>12} "
              f"{'driver x':>9} {'server x':>9} {'workers x':>10} {'total x':>8} "
              f"{'s/round':>8}" + (f" {'disk MiB':>9}" if disk else ""), flush=True)
        for n, r in results.items():
            ratios = " ".join(f"{r[k] / first[k]:>{w}.3f}" for k, w in zip(procs, (9, 9, 10)))
            total = sum(r[k] for k in procs) / base
            print(f"{n:>10} {r['driver']:>11.0f} {r['server']:>11.0f} {r['workers']:>12.0f} "
                  f"{ratios} {total:>8.3f} {r['round_seconds']:>8.3f}"
                  + (f" {r['disk']:>9.2f}" if disk else ""), flush=True)
        last = results[args.populations[-1]]
        total = sum(last[k] for k in procs) / base
        if total > args.target:
            failed.append(f"{scheme}: {total:.3f}x")
    print(f"\ntarget: total memory at {args.populations[-1]:,} clients at most "
          f"{args.target}x that at {args.populations[0]:,}: "
          + ("met for every scheme" if not failed else "NOT met for " + ", ".join(failed)))
    if args.check_resume:
        print(check_resume(max(args.populations), args.rounds, args.per_round, args.algorithm))


if __name__ == "__main__":
    main()

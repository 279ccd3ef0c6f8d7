"""Start-up: the quick start's time from command to round 1, here and in another checkout.

Runs the README's quick start (``scripts/simulate.py clients=100``, cut to
``--rounds`` rounds) ``--repeats`` times in fresh processes and reports the
median ``setup_seconds`` of ``summary.json`` (from ``run_simulation``'s start
to round 1: data, Ray, the actors' start) and the median wall time of the
whole command. With ``--baseline DIR`` (another checkout of fedsim, e.g.
``git worktree add /tmp/old <rev>`` and ``uv sync --locked`` there) the two
checkouts run alternately, so that the machine's drift hits both alike, and
the ratios new / baseline are printed::

    uv run python benchmarks/startup.py [--repeats 5] [--baseline /tmp/old]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start(checkout: Path, rounds: int) -> tuple[float, float]:
    """(setup_seconds, wall seconds) of one quick-start run in ``checkout``."""
    with tempfile.TemporaryDirectory(prefix="fedsim-startup-") as out:
        t0 = time.perf_counter()
        subprocess.run(["uv", "run", "--project", str(checkout), "python",
                        str(checkout / "scripts" / "simulate.py"), "clients=100",
                        f"rounds={rounds}", "progress=false", f"hydra.run.dir={out}"],
                       cwd=checkout, check=True, capture_output=True,
                       env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
        wall = time.perf_counter() - t0
        setup = json.loads((Path(out) / "summary.json").read_text())["setup_seconds"]
    return float(setup), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--baseline", type=Path, default=None,
                   help="another fedsim checkout (with its uv environment) to compare with")
    args = p.parse_args()
    sides = {"this checkout": ROOT}
    if args.baseline is not None:
        sides["baseline"] = args.baseline.resolve()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    for i in range(args.repeats):
        order = list(sides.items())
        for name, checkout in (order if i % 2 == 0 else order[::-1]):
            times[name].append(quick_start(checkout, args.rounds))
            print(f"{name:14s} setup {times[name][-1][0]:6.2f} s, command "
                  f"{times[name][-1][1]:6.2f} s", flush=True)
    med = {k: (statistics.median(s for s, _ in v), statistics.median(w for _, w in v))
           for k, v in times.items()}
    print(f"\nmedians over {args.repeats} runs (quick start, {args.rounds} round(s)):")
    for name, (setup, wall) in med.items():
        print(f"  {name:14s} setup_seconds {setup:6.2f}  command {wall:6.2f} s")
    if "baseline" in med:
        (s_new, w_new), (s_old, w_old) = med["this checkout"], med["baseline"]
        print(f"  ratio (this / baseline): setup {s_new / s_old:.2f}, command {w_new / w_old:.2f}")


if __name__ == "__main__":
    main()

"""fedsim against TFF, Flower, the naive loop and the roofline: one fixed workload,
side by side, in one invocation on one machine.

    uv run python benchmarks/compare_simulators.py \\
        --clients-per-round 10 100 1000 --models cnn mlp --dp none gaussian \\
        [--systems fedsim roofline ...] [--rounds 3] [--gpu]

Workload (``benchmarks/workload.py``): 1,000 clients of 50 MNIST-shaped
(28x28x1) examples, synthetic (seeded class templates plus noise, stored as a
Keras ``mnist.npz``: nothing is downloaded); a 98k-parameter CNN (3x3 convs of
16/32/64 filters with max pooling, dense 128) or a 102k-parameter MLP
(784-128-10), fedsim's architectures and initial weights everywhere; 1 local
epoch, batch 10, client SGD lr 0.05, server SGD lr 1.0 (FedAvg, clients
weighted equally). ``--dp gaussian``: central DP as TFF's ``gaussian_fixed``,
clip 1.0, noise multiplier 1.0 (std 1.0 on the sum, 1/clients_per_round on the
average). Every system runs ``--warmup`` untimed rounds (tracing, actor start)
and then ``--rounds`` timed rounds; the test accuracy is taken after the last.

Systems, each in its own process:

* ``fedsim``: ``fedsim.simulation.run_simulation`` on a local Ray instance with
  ``--cpus`` CPUs (one worker actor per CPU), data=mnist from the generated file,
  partition=iid (50 examples per client), otherwise fedsim's default settings
  (``client.vectorize=auto`` picks the trainer; the row's "path" says which);
  the other systems get exactly the clients fedsim's partition makes.
* ``fedsim_one_at_a_time``: the same with ``client.vectorize=0`` (LocalTrainer,
  one client per compiled call).
* ``tff``: TFF's ``build_unweighted_fed_avg`` (Keras model via
  ``from_keras_model``, ``DifferentiallyPrivateFactory.gaussian_fixed`` or
  ``UnweightedMeanFactory``), TFF's default local C++ runtime; its
  ``worker_binary`` processes are terminated afterwards.
* ``flower``: Flower's simulation engine (``flwr.simulation.run_simulation``,
  on its own Ray, 1 CPU per client actor) with FedAvg wrapped in
  ``DifferentialPrivacyServerSideFixedClipping``; its clients ``model.fit`` the
  same Keras model. Runs in a separate venv the harness creates with uv
  (``--flower-venv``, cached; skipped with a message if it cannot be created).
* ``naive``: fedsim's LocalTrainer, client after client, in one process (all
  CPUs available to TensorFlow; its small ops use about one).
* ``fedsim_vectorized``: fedsim with ``client.vectorize=--vectorize`` (its workers
  train that many clients per compiled call).
* ``vectorized``: fedsim's VectorizedTrainer standalone (``--vectorize`` clients
  per compiled call), one process with TensorFlow's default thread pools (all
  CPUs), no Ray.
* ``roofline``: the model's training throughput at batch 1,000, as client
  updates per second (one update = 50 examples x 1 epoch).

Outputs in ``--out`` (default ``benchmarks/results/``): ``results.json`` (every
run's numbers), ``results.md`` (the table, also printed, with fedsim's and the
vectorized trainer's throughput relative to each other system) and
``throughput.png``. ``--gpu`` runs the same with GPUs (fedsim's workers and
Flower's actors share them, TFF and the in-process systems use TF's default
placement) and is skipped with a message when TensorFlow sees no GPU.

Numbers are wall-clock throughput: on a shared or loaded machine they are
noisy; compare rows of one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import workload as W  # noqa: E402

SYSTEMS = ("fedsim", "fedsim_one_at_a_time", "fedsim_vectorized", "vectorized", "tff",
           "flower", "naive", "roofline")
LABELS = {"fedsim": "fedsim (Ray actors, default settings)",
          "fedsim_one_at_a_time": "fedsim, client.vectorize=0 (Ray actors)",
          "fedsim_vectorized": "fedsim, client.vectorize=K (Ray actors)",
          "vectorized": "fedsim vectorized, standalone",
          "tff": "TFF simulation", "flower": "Flower simulation", "naive": "naive loop",
          "roofline": "roofline (batch 1,000)"}
FLWR_VERSION = "1.23.0"  # newest that resolves with tensorflow-cpu 2.14.1 (protobuf < 5)
TF_VERSION = "2.14.1"    # fedsim's TensorFlow: the same kernels in every system


# ------------------------------------------------------------------------------ setup
def make_data(data_dir: Path, seed: int) -> None:
    """mnist.npz (for fedsim) and clients.npz (fedsim's iid split, for the others)."""
    if (data_dir / "clients.npz").exists() and (data_dir / "seed").exists() \
            and (data_dir / "seed").read_text() == str(seed):
        return
    from fedsim.config import DataConfig
    from fedsim.data.loaders import load_federated_data

    data_dir.mkdir(parents=True, exist_ok=True)
    arrays = W.generate(seed)
    np.savez_compressed(data_dir / "mnist.npz", **arrays)
    fed = load_federated_data(DataConfig(name="mnist", path=str(data_dir / "mnist.npz"),
                                         partition="iid"), W.NUM_CLIENTS, seed)
    idx = [fed.train.partition.client_indices(c) for c in range(W.NUM_CLIENTS)]
    if any(len(i) != W.EXAMPLES_PER_CLIENT for i in idx):
        raise SystemExit("unexpected partition: clients do not all hold "
                         f"{W.EXAMPLES_PER_CLIENT} examples")
    np.savez_compressed(data_dir / "clients.npz",
                        x_clients=np.stack([arrays["x_train"][i] for i in idx]),
                        y_clients=np.stack([arrays["y_train"][i] for i in idx]),
                        x_test=arrays["x_test"], y_test=arrays["y_test"])
    (data_dir / "seed").write_text(str(seed))


def flower_python(venv: Path, gpu: bool) -> tuple[Path | None, str]:
    """The Flower venv's python, created with uv on first use; (None, why) if not."""
    python = venv / "bin" / "python"
    ok_file = venv / ".fedsim-bench-ok"
    if ok_file.exists() and python.exists():
        return python, ""
    uv = shutil.which("uv")
    if uv is None:
        return None, "uv not found on PATH"
    tf_pkg = f"tensorflow[and-cuda]=={TF_VERSION}" if gpu else f"tensorflow-cpu=={TF_VERSION}"
    steps = [[uv, "venv", str(venv), "--python", "3.11", "--clear"],
             [uv, "pip", "install", "--python", str(python), f"flwr[simulation]=={FLWR_VERSION}",
              tf_pkg, "psutil"]]
    print(f"creating the Flower venv {venv} (flwr[simulation]=={FLWR_VERSION}, {tf_pkg})",
          flush=True)
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return None, f"`{' '.join(cmd[:3])} ...` failed: " + " | ".join(tail)
    ok_file.write_text(FLWR_VERSION)
    return python, ""


def gpu_visible() -> bool:
    code = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return proc.returncode == 0 and proc.stdout.strip().splitlines()[-1:] != ["0"]


# ------------------------------------------------------------------------------ runs
def _stop_session(pid: int) -> None:
    """Terminate what a finished runner left behind in its own session (TFF's
    worker_binary, Ray's processes), and nothing else; wait until it is gone, so
    that its shutdown does not eat into the next runner's measurement (a roofline
    timed while a Ray session was still exiting read half its throughput)."""
    import psutil

    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == pid:
                proc.terminate()
                left.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    _, alive = psutil.wait_procs(left, timeout=20)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def run_one(system: str, model: str, dp: str, cpr: int, a: argparse.Namespace,
            flower_py: Path | None, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{system}-{model}-{dp}-{cpr}.json"
    out.unlink(missing_ok=True)
    common = ["--model", model, "--dp", dp, "--clients-per-round", str(cpr),
              "--rounds", str(a.rounds), "--warmup", str(a.warmup), "--seed", str(a.seed),
              "--cpus", str(a.cpus), "--data", str(workdir / "data"), "--out", str(out)]
    if a.gpu:
        common.append("--gpu")
    if system == "flower":
        cmd = [str(flower_py), str(HERE / "flower_baseline.py"), *common]
    else:
        cmd = [sys.executable, str(HERE / "sim_runners.py"), system, *common,
               "--vectorize", str(a.vectorize)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(W.REPO)]),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = workdir / f"{out.stem}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            rc = "timeout"
    _stop_session(proc.pid)
    seconds = time.perf_counter() - t0
    if rc != 0 or not out.exists():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        return {"system": system, "model": model, "dp": dp, "clients_per_round": cpr,
                "error": f"exit {rc}; see {log}: " + " | ".join(tail)[-400:],
                "process_seconds": seconds}
    result = json.loads(out.read_text())
    result.update(system=system, model=model, dp=dp, clients_per_round=cpr,
                  process_seconds=seconds)
    return result


# ------------------------------------------------------------------------------ report
def _mem(r: dict[str, Any]) -> str:
    m = r.get("memory_mib", {})
    driver = m.get("driver_peak")
    actors = sum(v for k, v in m.items() if k.endswith("_peak") and k != "driver_peak"
                 and k != "ray_processes_peak")
    text = f"{driver:.0f}" if driver else "-"
    return text + (f" / {actors:.0f}" if actors else "")


def _breakdown(r: dict[str, Any]) -> str:
    b = r.get("breakdown", {})
    keys = {"process_next_seconds": "next", "client_datasets_seconds": "datasets",
            "client_fit_seconds_sum": "clients' fit (sum)", "train_seconds": "train",
            "eval_seconds_last_round": "eval", "setup_seconds": "setup",
            "seconds_per_step_of_1000": "step of 1000",
            "updates_per_s_at_batch_100": "[updates/s at batch 100:",
            "updates_per_s_at_batch_50": "at batch 50:"}
    text = ", ".join(f"{label} {b[k]:.2f}" if "updates" not in k else f"{label} {b[k]:.0f}"
                     for k, label in keys.items() if isinstance(b.get(k), (int, float)))
    text += "]" if "[" in text else ""
    if r.get("client_vectorize") is not None:  # which trainer fedsim ran
        text = f"path: client.vectorize={r['client_vectorize']}" + (", " if text else "") + text
    return text


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    configs = list(dict.fromkeys((r["model"], r["dp"], r["clients_per_round"])
                                 for r in results))  # in the order they ran
    for model, dp, cpr in configs:
        rows = {r["system"]: r for r in results
                if (r["model"], r["dp"], r["clients_per_round"]) == (model, dp, cpr)}
        lines += [f"### {model}, dp={dp}, {cpr} clients per round", "",
                  "| system | client updates/s | s/round | breakdown (s/round) | peak MiB driver"
                  " / actors | final accuracy | fedsim is x | vectorized is x |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        ref = {s: rows[s]["updates_per_s"] for s in ("fedsim", "vectorized")
               if s in rows and "updates_per_s" in rows[s]}
        for system in SYSTEMS:
            r = rows.get(system)
            if r is None:
                continue
            if "error" in r or "skipped" in r:
                why = r.get("skipped") or r["error"]
                lines.append(f"| {LABELS[system]} | {why} | | | | | | |")
                continue
            ups = r["updates_per_s"]
            acc = r.get("final_accuracy")
            ratios = [f"{ref[s] / ups:.2f}" if s in ref and s != system else "" for s in
                      ("fedsim", "vectorized")]
            lines.append(f"| {LABELS[system]} | {ups:.1f} | {r['mean_round_seconds']:.3f} | "
                         f"{_breakdown(r)} | {_mem(r)} | "
                         f"{'-' if acc is None else f'{acc:.3f}'} | {ratios[0]} | {ratios[1]} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "updates_per_s" in r]
    configs = list(dict.fromkeys((r["model"], r["dp"], r["clients_per_round"]) for r in ok))
    if not configs:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(configs)), 4))
    width = 0.8 / len(SYSTEMS)
    for i, system in enumerate(SYSTEMS):
        vals = [next((r["updates_per_s"] for r in ok if r["system"] == system and
                      (r["model"], r["dp"], r["clients_per_round"]) == c), 0.0)
                for c in configs]
        ax.bar(np.arange(len(configs)) + (i - len(SYSTEMS) / 2 + 0.5) * width, vals, width,
               label=LABELS[system])
    ax.set_xticks(np.arange(len(configs)))
    ax.set_xticklabels([f"{m}\ndp={d}\n{c}/round" for m, d, c in configs])
    ax.set_ylabel("client updates / s")
    ax.set_yscale("log")
    ax.set_title("Client updates per second (50 examples x 1 epoch each), same machine")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients-per-round", type=int, nargs="+", default=[10, 100, 1000],
                    help="cohort sizes (of the 1,000 clients; 1000: all of them each round)")
    ap.add_argument("--models", nargs="+", choices=sorted(W.MODELS), default=["cnn", "mlp"])
    ap.add_argument("--dp", nargs="+", choices=sorted(W.DP), default=["none", "gaussian"])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                    help="CPUs for fedsim's and Flower's Ray (one actor per CPU)")
    ap.add_argument("--vectorize", type=int, default=64,
                    help="clients per compiled call of the vectorized trainer")
    ap.add_argument("--gpu", action="store_true", help="use the GPU(s); skipped if none")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--flower-venv", type=Path, default=HERE / ".flower-venv")
    a = ap.parse_args()

    if a.gpu and not gpu_visible():
        print("compare_simulators: --gpu: TensorFlow sees no GPU on this machine; skipped.")
        return
    if a.gpu and a.flower_venv == HERE / ".flower-venv":
        a.flower_venv = HERE / ".flower-venv-gpu"
    out = a.out / ("gpu" if a.gpu else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    make_data(out / "data", a.seed)
    flower_py, why = (flower_python(a.flower_venv, a.gpu) if "flower" in a.systems
                      else (None, ""))
    if "flower" in a.systems and flower_py is None:
        print(f"compare_simulators: Flower skipped: {why}", flush=True)

    results: list[dict[str, Any]] = []
    for model in a.models:
        for dp in a.dp:
            for cpr in a.clients_per_round:
                for system in a.systems:
                    if system == "roofline" and dp != a.dp[0]:
                        # The roofline has no DP: measured once per model and cohort.
                        prev = next(r for r in results if r["system"] == "roofline"
                                    and r["model"] == model and r["clients_per_round"] == cpr)
                        results.append({**prev, "dp": dp})
                        continue
                    if system == "flower" and flower_py is None:
                        results.append({"system": system, "model": model, "dp": dp,
                                        "clients_per_round": cpr,
                                        "skipped": f"skipped: {why}"})
                        continue
                    print(f"[{time.strftime('%H:%M:%S')}] {system:>10} {model} dp={dp} "
                          f"{cpr}/round ...", end=" ", flush=True)
                    r = run_one(system, model, dp, cpr, a, flower_py, out)
                    results.append(r)
                    print(r.get("error") or r.get("skipped")
                          or f"{r['updates_per_s']:.1f} updates/s "
                          f"({r['process_seconds']:.0f} s)", flush=True)
                    (out / "results.json").write_text(json.dumps(results, indent=1))
    meta = {"cpus": a.cpus, "os_cpus": os.cpu_count(), "rounds": a.rounds,
            "warmup": a.warmup, "gpu": a.gpu, "load_average": os.getloadavg(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                 indent=1))
    text = table(results)
    header = (f"Client updates per second, {a.rounds} timed rounds after {a.warmup} warm-up;"
              f" {a.cpus} CPUs{' + GPU' if a.gpu else ''}; load average at the end "
              f"{meta['load_average'][0]:.1f}. \"x is r\": r times that row's throughput.\n\n")
    (out / "results.md").write_text(header + text)
    plot(results, out / "throughput.png")
    print()
    print(header + text)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, {out / 'throughput.png'}")


if __name__ == "__main__":
    main()

"""Flower's simulation engine on the workload of ``compare_simulators.py``.

Runs in its own venv (``flwr[simulation]`` pins its own Ray), which
``compare_simulators.py`` creates with uv; same command line as
``sim_runners.py``:

    .flower-venv/bin/python benchmarks/flower_baseline.py --model cnn --dp gaussian \
        --clients-per-round 10 --rounds 3 --warmup 1 --data DIR --out result.json

Flower's current API: a ``ServerApp`` (FedAvg, wrapped for central DP in
``DifferentialPrivacyServerSideFixedClipping``: clip 1.0, noise multiplier 1.0,
noise std z * C / clients on the average, as TFF's gaussian_fixed) and a
``ClientApp`` whose ``NumPyClient`` trains fedsim's Keras model with
``model.fit`` (SGD lr 0.05, batch 10, 1 epoch), run by
``flwr.simulation.run_simulation`` on Ray with 1 CPU per client actor. Round
time: from the strategy's ``configure_fit`` to the end of its
``aggregate_fit``; the clients report their ``fit`` time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import workload as W  # noqa: E402

_STATE: dict[str, Any] = {}


def _model():
    """This process's Keras model (built and compiled once per actor)."""
    if "model" not in _STATE:
        import tensorflow as tf

        threads = int(os.environ.get("FEDSIM_BENCH_TF_THREADS", "1"))
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            pass
        model = W.build_keras_model(os.environ["FEDSIM_BENCH_MODEL"])
        model.compile(optimizer=tf.keras.optimizers.SGD(W.CLIENT_LR),
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        _STATE["model"] = model
        _STATE["clients"] = W.Clients(Path(os.environ["FEDSIM_BENCH_DATA"]) / "clients.npz")
    return _STATE["model"], _STATE["clients"]


def client_app():
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context

    class KerasClient(NumPyClient):
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters, config):
            model, clients = _model()
            x, y = clients.client(self.cid)
            t0 = W.now()
            model.set_weights(parameters)
            model.fit(x, y, batch_size=W.BATCH_SIZE, epochs=W.LOCAL_EPOCHS, shuffle=True,
                      verbose=0)
            return model.get_weights(), len(y), {"fit_seconds": W.now() - t0}

    def client_fn(context: Context):
        return KerasClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn)


def server_app(a: argparse.Namespace, log: dict[str, list]):
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    rounds = a.warmup + a.rounds
    init = W.build_keras_model(a.model)
    clients = W.Clients(Path(a.data) / "clients.npz")

    def evaluate_fn(server_round, parameters, config):
        if server_round != rounds:
            return None
        init.set_weights(parameters)
        acc = W.accuracy(init, clients.x_test, clients.y_test)
        log["final_accuracy"] = [acc]
        return 0.0, {"accuracy": acc}

    def fit_metrics(metrics):
        log["fit_seconds"].append(sum(m["fit_seconds"] for _, m in metrics))
        return {}

    strategy = FedAvg(fraction_fit=a.clients_per_round / W.NUM_CLIENTS, fraction_evaluate=0.0,
                      min_fit_clients=a.clients_per_round, min_evaluate_clients=0,
                      min_available_clients=W.NUM_CLIENTS,
                      initial_parameters=ndarrays_to_parameters(init.get_weights()),
                      evaluate_fn=evaluate_fn, fit_metrics_aggregation_fn=fit_metrics)
    dp = W.DP[a.dp]
    if dp:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=dp["noise_multiplier"], clipping_norm=dp["l2_norm_clip"],
            num_sampled_clients=a.clients_per_round)
    configure, aggregate = strategy.configure_fit, strategy.aggregate_fit

    def timed_configure(server_round, parameters, client_manager):
        log["start"].append(W.now())
        return configure(server_round, parameters, client_manager)

    def timed_aggregate(server_round, results, failures):
        if failures:
            log["failures"].append(len(failures))
        out = aggregate(server_round, results, failures)
        log["end"].append(W.now())
        return out

    strategy.configure_fit = timed_configure
    strategy.aggregate_fit = timed_aggregate

    def server_fn(context: Context):
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    W.add_run_arguments(ap)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not a.gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # Read by the client actors (Ray passes the driver's environment on).
    os.environ["FEDSIM_BENCH_MODEL"] = a.model
    os.environ["FEDSIM_BENCH_DATA"] = str(Path(a.data).resolve())

    # The client side by reference (module flower_baseline, importable in the actors
    # through PYTHONPATH), not pickled by value from __main__: each actor then keeps
    # its Keras model in the module's _STATE across fit calls.
    import flower_baseline
    import flwr
    from flwr.simulation import run_simulation

    log: dict[str, list] = {"start": [], "end": [], "fit_seconds": [], "failures": [],
                            "final_accuracy": []}
    actors = W.name_is("ClientAppActor")
    t0 = W.now()
    with W.PeakMemory({"actors": actors, "ray_all": W.name_is("ray::", "raylet", "gcs_server")
                       }) as mem:
        run_simulation(
            server_app=server_app(a, log), client_app=flower_baseline.client_app(),
            num_supernodes=W.NUM_CLIENTS,
            backend_config={"client_resources": {"num_cpus": 1,
                                                 "num_gpus": (1.0 / a.cpus if a.gpu else 0.0)},
                            "init_args": {"num_cpus": a.cpus, "num_gpus": 1 if a.gpu else 0,
                                          "include_dashboard": False,
                                          "log_to_driver": False}})
    wall = W.now() - t0
    rounds = [e - s for s, e in zip(log["start"], log["end"])]
    if len(rounds) != a.warmup + a.rounds:
        raise SystemExit(f"flower: {len(rounds)} rounds completed of {a.warmup + a.rounds}"
                         f" (failures: {log['failures']})")
    timed = rounds[a.warmup:]
    result = {
        "system": "flower", "model": a.model, "dp": a.dp,
        "clients_per_round": a.clients_per_round,
        "round_seconds": timed, "warmup_round_seconds": rounds[:a.warmup],
        "mean_round_seconds": float(np.mean(timed)),
        "updates_per_s": a.clients_per_round * len(timed) / float(np.sum(timed)),
        "breakdown": {"client_fit_seconds_sum": float(np.mean(log["fit_seconds"][a.warmup:])),
                      "wall_seconds": wall, "failures": sum(log["failures"])},
        "memory_mib": {"driver_peak": mem.peak_self,
                       "client_actors_peak": mem.peak["actors"],
                       "ray_processes_peak": mem.peak["ray_all"]},
        "final_accuracy": (log["final_accuracy"] or [None])[-1],
        "version": flwr.__version__,
    }
    Path(a.out).write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()

"""One simulator on the workload of ``compare_simulators.py``, in its own process.

Run by ``compare_simulators.py`` (one process per system and configuration, so
peak memory and TensorFlow's state are each run's own); writes one JSON result:

    python benchmarks/sim_runners.py SYSTEM --model cnn --dp none --clients-per-round 10 \
        --rounds 3 --warmup 1 --data DIR --out result.json [--gpu]

SYSTEM: ``fedsim`` (``run_simulation``, Ray actors, default settings),
``fedsim_one_at_a_time`` (the same with ``client.vectorize=0``),
``fedsim_vectorized`` (the same with ``client.vectorize=--vectorize``), ``tff`` (TFF's
``build_unweighted_fed_avg``), ``naive`` (fedsim's LocalTrainer, client after
client, one process), ``vectorized`` (fedsim's VectorizedTrainer, standalone,
one process), ``roofline`` (the model's training throughput at batch 1,000).
Flower runs from ``flower_baseline.py`` in its own venv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import workload as W  # noqa: E402


def _timed_summary(round_seconds: list[float], warmup: int, cpr: int) -> dict[str, Any]:
    timed = round_seconds[warmup:]
    return {"round_seconds": timed, "warmup_round_seconds": round_seconds[:warmup],
            "mean_round_seconds": float(np.mean(timed)),
            "updates_per_s": cpr * len(timed) / float(np.sum(timed))}


# ---------------------------------------------------------------------------- fedsim
def run_fedsim(a: argparse.Namespace, vectorize: int | None = None) -> dict[str, Any]:
    """fedsim's run_simulation; ``vectorize`` (not None) sets ``client.vectorize``
    (the workers train that many clients per compiled call; 0: one at a time),
    None keeps fedsim's default."""
    from fedsim.config import ClientConfig, DataConfig, DPConfig, RayConfig, ServerConfig, SimConfig
    from fedsim.simulation import run_simulation

    client_kw: dict[str, Any] = {}
    if vectorize is not None:
        client_kw["vectorize"] = vectorize
    dp = W.DP[a.dp]
    rounds = a.warmup + a.rounds
    cfg = SimConfig(
        clients=W.NUM_CLIENTS, clients_per_round=a.clients_per_round, rounds=rounds,
        local_epochs=W.LOCAL_EPOCHS, batch_size=W.BATCH_SIZE, eval_every=rounds,
        seed=a.seed, progress=False, checkpoint_every=0,
        data=DataConfig(name="mnist", path=str(Path(a.data) / "mnist.npz"), partition="iid"),
        model=W.model_config(a.model),
        client=ClientConfig(learning_rate=W.CLIENT_LR, **client_kw),
        server=ServerConfig(learning_rate=W.SERVER_LR, weighting="uniform"),
        dp=(DPConfig(mechanism="gaussian", **dp) if dp else DPConfig()),
        ray=RayConfig(num_cpus=a.cpus, gpus_per_worker=(1.0 / a.cpus if a.gpu else 0.0)))
    with tempfile.TemporaryDirectory() as out, W.PeakMemory() as sampled:
        result = run_simulation(cfg, Path(out) / "run")
    rows, summary = result.metrics, result.summary
    res = _timed_summary([r["round_seconds"] for r in rows], a.warmup, a.clients_per_round)
    mem = summary["memory_mib"]
    res.update(
        breakdown={"eval_seconds_last_round": rows[-1].get("eval_seconds"),
                   "setup_seconds": summary.get("setup_seconds"),
                   "wall_seconds": summary.get("wall_seconds")},
        memory_mib={"driver_peak": sampled.peak_self,
                    "server_actor_peak": mem["server"]["peak"],
                    "worker_actors_peak": sum(w["peak"] for w in mem["workers"]),
                    "workers": len(mem["workers"])},
        client_vectorize=summary.get("config", {}).get("client", {}).get("vectorize"),
        final_accuracy=summary["final"]["eval_accuracy"],
        num_parameters=summary.get("num_parameters"),
        version=summary.get("versions", {}).get("fedsim", "0.1.0"))
    return res


# ---------------------------------------------------------------------------- TFF
@contextlib.contextmanager
def _stop_worker_binaries():
    """Terminate TFF's C++ worker_binary children on the way out (they outlive us)."""
    try:
        yield
    finally:
        from fedsim.interop.tff import stop_tff_worker_binaries

        stop_tff_worker_binaries()


def run_tff(a: argparse.Namespace) -> dict[str, Any]:
    import tensorflow as tf
    import tensorflow_federated as tff

    clients = W.Clients(Path(a.data) / "clients.npz")
    spec = (tf.TensorSpec([None, *W.IMAGE_SHAPE], tf.float32), tf.TensorSpec([None], tf.int32))

    def model_fn():
        return tff.learning.models.from_keras_model(
            W.build_keras_model(a.model), input_spec=spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    dp = W.DP[a.dp]
    if dp:
        aggregator = tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
            noise_multiplier=dp["noise_multiplier"], clients_per_round=a.clients_per_round,
            clip=dp["l2_norm_clip"])
    else:
        aggregator = tff.aggregators.UnweightedMeanFactory()
    process = tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=W.CLIENT_LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=W.SERVER_LR),
        model_aggregator=aggregator)
    state = process.initialize()
    init = W.build_keras_model(a.model)  # fedsim's initial weights, as everywhere
    state = process.set_model_weights(state, tff.learning.models.ModelWeights(
        trainable=[v.numpy() for v in init.trainable_variables], non_trainable=[]))

    round_seconds, data_seconds, next_seconds = [], [], []
    binaries = {"worker_binary": W.name_is("worker_binary")}
    with W.PeakMemory(binaries) as mem, _stop_worker_binaries():
        for rnd in range(1, a.warmup + a.rounds + 1):
            t0 = W.now()
            datasets = []
            for cid in W.cohort(a.seed, rnd, a.clients_per_round):
                x, y = clients.client(int(cid))
                datasets.append(tf.data.Dataset.from_tensor_slices((x, y))
                                .shuffle(len(y), seed=int(cid) + 1000 * rnd)
                                .batch(W.BATCH_SIZE))
            t1 = W.now()
            state = process.next(state, datasets).state
            t2 = W.now()
            round_seconds.append(t2 - t0)
            data_seconds.append(t1 - t0)
            next_seconds.append(t2 - t1)
        weights = process.get_model_weights(state)
    for v, value in zip(init.trainable_variables, weights.trainable):
        v.assign(value)
    res = _timed_summary(round_seconds, a.warmup, a.clients_per_round)
    res.update(
        breakdown={"client_datasets_seconds": float(np.mean(data_seconds[a.warmup:])),
                   "process_next_seconds": float(np.mean(next_seconds[a.warmup:]))},
        memory_mib={"driver_peak": mem.peak_self,
                    "worker_binary_peak": mem.peak["worker_binary"]},
        final_accuracy=W.accuracy(init, clients.x_test, clients.y_test),
        version=tff.__version__)
    return res


# ---------------------------------------------------------------------- naive / vectorized
def run_loop(a: argparse.Namespace, vectorized: bool) -> dict[str, Any]:
    import tensorflow as tf

    from fedsim.client.local import LocalTrainer
    from fedsim.client.vectorized import VectorizedTrainer
    from fedsim.config import ClientConfig
    from fedsim.models.spec import model_spec

    clients = W.Clients(Path(a.data) / "clients.npz")
    args = (model_spec(W.model_config(a.model)), ClientConfig(learning_rate=W.CLIENT_LR),
            W.IMAGE_SHAPE, W.NUM_CLASSES, W.BATCH_SIZE, W.LOCAL_EPOCHS)
    trainer = (VectorizedTrainer(*args, seed=W.MODEL_SEED, max_clients_per_call=a.vectorize)
               if vectorized else LocalTrainer(*args, seed=W.MODEL_SEED))
    weights = trainer.flat.get().numpy()
    dp = W.DP[a.dp]
    noise = np.random.default_rng([a.seed, 0xD9])
    round_seconds, train_seconds = [], []
    sampler = W.PeakMemory().__enter__()
    for rnd in range(1, a.warmup + a.rounds + 1):
        t0 = W.now()
        ids = W.cohort(a.seed, rnd, a.clients_per_round)
        jobs = [(*clients.client(int(c)), np.random.default_rng([a.seed, rnd, int(c)]))
                for c in ids]
        if vectorized:
            results = trainer.train_many(weights, jobs)
        else:
            results = [trainer.train(weights, *job) for job in jobs]
        t1 = W.now()
        weights = weights - W.SERVER_LR * W.clip_and_noise([r.delta for r in results], dp, noise)
        round_seconds.append(W.now() - t0)
        train_seconds.append(t1 - t0)
    sampler.__exit__()
    from fedsim.models.keras import FlatWeights

    model = W.build_keras_model(a.model)
    FlatWeights(model.trainable_variables).assign(tf.constant(weights))
    res = _timed_summary(round_seconds, a.warmup, a.clients_per_round)
    res.update(breakdown={"train_seconds": float(np.mean(train_seconds[a.warmup:]))},
               memory_mib={"driver_peak": sampler.peak_self},
               final_accuracy=W.accuracy(model, clients.x_test, clients.y_test),
               version=tf.__version__)
    if vectorized:
        res["max_clients_per_call"] = a.vectorize
    return res


# ---------------------------------------------------------------------------- roofline
ROOFLINE_SECONDS = 2.0  # timed steps per batch size, at least


def run_roofline(a: argparse.Namespace) -> dict[str, Any]:
    """Throughput of plain minibatch SGD on one model at batch 1,000 (the row), and
    at batches 100 and 50 for reference (on CPUs a batch of 1,000 can be slower per
    example than smaller ones: its activations do not fit in cache)."""
    import tensorflow as tf

    model = W.build_keras_model(a.model)
    opt = tf.keras.optimizers.SGD(W.CLIENT_LR)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    examples_per_update = W.EXAMPLES_PER_CLIENT * W.LOCAL_EPOCHS
    per_batch = {}
    with W.PeakMemory() as mem:
        for batch in (1000, 100, 50):
            x = tf.constant(rng.random((batch, *W.IMAGE_SHAPE), dtype=np.float32))
            y = tf.constant(rng.integers(0, W.NUM_CLASSES, batch).astype(np.int32))
            step(x, y).numpy()
            times: list[float] = []
            # At least 20 steps and 2 s per batch size: a few steps of batch
            # 1,000 (tens of ms) swung the MLP's median twofold between runs.
            while len(times) < 20 or sum(times) < ROOFLINE_SECONDS:
                t0 = W.now()
                step(x, y).numpy()  # .numpy() waits for the step
                times.append(W.now() - t0)
            per_batch[batch] = float(np.median(times))
    ups = {b: b / t / examples_per_update for b, t in per_batch.items()}
    return {"updates_per_s": ups[1000],
            "mean_round_seconds": a.clients_per_round / ups[1000],
            "round_seconds": [],
            "breakdown": {"seconds_per_step_of_1000": per_batch[1000],
                          "updates_per_s_at_batch_100": ups[100],
                          "updates_per_s_at_batch_50": ups[50]},
            "memory_mib": {"driver_peak": mem.peak_self},
            "final_accuracy": None, "version": tf.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("system", choices=["fedsim", "fedsim_one_at_a_time", "fedsim_vectorized",
                                       "tff", "naive", "vectorized", "roofline"])
    W.add_run_arguments(ap)
    ap.add_argument("--vectorize", type=int, default=16, help="clients per vectorized call")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not a.gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    run = {"fedsim": run_fedsim, "fedsim_vectorized": lambda a: run_fedsim(a, a.vectorize),
           "fedsim_one_at_a_time": lambda a: run_fedsim(a, 0),
           "tff": run_tff, "roofline": run_roofline,
           "naive": lambda a: run_loop(a, False), "vectorized": lambda a: run_loop(a, True)}
    result = run[a.system](a)
    result.update(system=a.system, model=a.model, dp=a.dp, clients_per_round=a.clients_per_round)
    Path(a.out).write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()

"""LocalTrainer vs VectorizedTrainer vs the roofline, in one process, no Ray.

    uv run python benchmarks/vectorized_micro.py --model mlp --threads 1 --ks 10 25 50 100

The workload of ``compare_simulators.py`` (clients of 50 28x28x1 examples,
batch 10, 1 epoch, SGD lr 0.05): ``--clients`` clients trained by LocalTrainer
one after another, by VectorizedTrainer with K clients per call for each K of
``--ks``, and the roofline (the same model, plain SGD steps at batch 1,000 on
the same number of examples). ``--threads`` sizes TensorFlow's thread pools
(fedsim's workers get one thread per CPU). Prints client updates per second
(one update = 50 examples x 1 epoch), best of ``--repeats``, each system
interleaved with the others so that load on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["cnn", "mlp"], default="mlp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--ks", type=int, nargs="*", default=[10, 25, 50, 100])
    ap.add_argument("--conv", nargs="+", default=["grouped"], help="conv backends")
    ap.add_argument("--dense", nargs="+", default=["factored"], help="dense backends")
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--examples", type=int, default=None,
                    help="examples per client (default: the workload's)")
    a = ap.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(a.threads)
    import workload as W

    from fedsim.client.local import LocalTrainer
    from fedsim.client.vectorized import VectorizedTrainer
    from fedsim.config import ClientConfig
    from fedsim.models.spec import model_spec

    rng = np.random.default_rng(0)
    n = a.examples or W.EXAMPLES_PER_CLIENT
    xs = rng.random((a.clients, n, *W.IMAGE_SHAPE), dtype=np.float32)
    ys = rng.integers(0, W.NUM_CLASSES, (a.clients, n)).astype(np.int32)
    args = (model_spec(W.model_config(a.model)), ClientConfig(learning_rate=W.CLIENT_LR),
            W.IMAGE_SHAPE, W.NUM_CLASSES, W.BATCH_SIZE, W.LOCAL_EPOCHS)

    runs = {}
    if not a.no_local:
        local = LocalTrainer(*args, seed=0)
        gw = local.flat.get().numpy()
        runs["local"] = lambda: [local.train(gw, xs[i], ys[i], np.random.default_rng(i))
                                 for i in range(a.clients)]
    for k in a.ks:
        for conv in (a.conv if a.model == "cnn" else a.conv[:1]):
            for dense in a.dense:
                vec = VectorizedTrainer(*args, seed=0, max_clients_per_call=k, conv=conv,
                                        dense=dense)
                gw = vec.flat.get().numpy()
                name = f"K={k} {conv if a.model == 'cnn' else ''} {dense}"
                runs[name] = (lambda vec=vec, gw=gw: vec.train_many(
                    gw, [(xs[i], ys[i], np.random.default_rng(i)) for i in range(a.clients)]))

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

    xr = tf.constant(xs.reshape(-1, 1000, *W.IMAGE_SHAPE)) if a.clients * n % 1000 == 0 \
        else None
    yr = tf.constant(ys.reshape(-1, 1000))
    runs["roofline (batch 1000)"] = lambda: [step(xr[i], yr[i]).numpy()
                                             for i in range(len(xr))]

    best = dict.fromkeys(runs, float("inf"))
    for fn in runs.values():
        fn()  # warm-up: tracing
    for _ in range(a.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    roof = a.clients * n / W.EXAMPLES_PER_CLIENT / best["roofline (batch 1000)"]
    print(f"{a.model}, {a.threads} thread(s), {a.clients} clients, load "
          f"{os.getloadavg()[0]:.1f}")
    for name, t in best.items():
        ups = a.clients * n / W.EXAMPLES_PER_CLIENT / t
        print(f"  {name:>24}: {ups:8.1f} updates/s  ({ups / roof:.2f} of the roofline)")


if __name__ == "__main__":
    main()

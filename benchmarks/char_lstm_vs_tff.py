"""fedsim against TensorFlow Federated on the character LSTM (Shakespeare's shape),
side by side, in one invocation on one machine: client updates per second.

    uv run python benchmarks/char_lstm_vs_tff.py [--clients-per-round 100] [--rounds 2] \\
        [--warmup 1] [--examples-per-client 4] [--out benchmarks/results/char_lstm]

Workload: ``--clients`` (1,000) synthetic clients in Shakespeare's shape, nothing
downloaded: each holds ``--examples-per-client`` sequences of 80 int32 char ids
over TFF's 90-token vocabulary (0 pad, 1..86 characters, 87 out-of-vocabulary,
88 beginning and 89 end of snippet), drawn from a seeded sparse first-order
Markov chain over the characters (so there is something to learn); about a
third of the sequences end early (end token, then padding). Labels are the
inputs shifted by one. Written once to ``clients.npz`` in ``--out`` so both
systems read identical clients, plus a 500-sequence test split.

Both systems train ``fedsim.models.char_lstm:build`` (TFF's
``create_recurrent_model``: embedding 8, two LSTMs of 256, 820,522 parameters)
from the same initial weights (TFF's initial state is set from the fedsim-built
Keras model, seed ``--seed`` as fedsim's server builds it), on the same cohort
each round (fedsim's uniform sampler, ``fedsim.rng.stream(seed, STREAM_SAMPLING,
round)``), 1 local epoch, batch 4, client SGD lr 1.0, server SGD lr 1.0
(FedAvg, clients weighted equally), no DP. Loss: the masked mean over tokens
(fedsim's ``NextTokenPrediction``; TFF's Keras ``SparseCategoricalCrossentropy
(from_logits=True)`` on the masked model output).

Each system runs in its own process (this file with ``--system``), so neither
pays for the other's TensorFlow or Ray state:

* ``fedsim``: ``run_simulation`` with a ``FederatedData(task=NextTokenPrediction
  (pad=0))`` over the clients, a local Ray instance with ``--cpus`` CPUs
  (``workers=auto``), progress off, evaluation only after the last round (not
  timed); the timed rounds are the metrics rows' ``round_seconds``.
* ``tff``: ``build_unweighted_fed_avg`` with ``from_keras_model``, TFF's default
  local runtime, per-client ``tf.data`` datasets batched by 4 (built inside the
  timed round, as ``sim_runners.run_tff`` does); its ``worker_binary`` children
  are terminated afterwards.

Both run ``--warmup`` untimed rounds, then ``--rounds`` timed ones. Afterwards
the final global weights of each are evaluated here the same way (the masked
token loss and accuracy on the test split) as a check that both trained the same
thing. Inside a TFF computation (TFF 0.87, TF 2.14) the Keras mask of the
embedding does not reach ``SparseCategoricalCrossentropy``, so TFF's
``forward_pass`` loss is the mean over ALL 80 positions, padding included
(checked: a fresh model's loss on one client inside
``tff.tensorflow.computation`` equals the unmasked Keras mean, not the masked one
it gives eagerly). fedsim's default next-token loss is the masked mean;
``--fedsim-loss tff`` (the default here) gives fedsim TFF's unmasked loss
(``model.loss=sparse_categorical_crossentropy``), so both train the same
objective and their final losses can be compared; ``--fedsim-loss masked``
measures fedsim's default. Each client does the same forward and backward work
either way (the mask only weights the token losses).
Outputs in ``--out``: ``results.json`` and ``results.md`` (also printed).
Wall-clock numbers on a shared machine are noisy: compare rows of one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(HERE), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

SEQ_LEN = 80
VOCAB = 90            # TFF's Shakespeare: 86 characters + pad, oov, bos, eos
PAD, OOV, BOS, EOS = 0, 87, 88, 89
BATCH_SIZE = 4        # Reddi et al.'s Shakespeare client batch
LOCAL_EPOCHS = 1
CLIENT_LR = 1.0
SERVER_LR = 1.0
TEST_SEQUENCES = 500


# ---------------------------------------------------------------------------- data
def generate(num_clients: int, per_client: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded sequences: a sparse Markov chain over the 86 characters, BOS first,
    about a third ending early (EOS then padding); y = x shifted by one."""
    rng = np.random.default_rng([seed, 0x5A4C])
    chars = np.arange(1, 87)
    succ = rng.choice(chars, size=(87, 6))          # 6 likely successors per char
    probs = rng.dirichlet(np.ones(6), size=87)

    def draw(n: int) -> np.ndarray:
        seq = np.zeros((n, SEQ_LEN + 1), np.int32)
        seq[:, 0] = BOS
        cur = rng.choice(chars, size=n)
        for t in range(1, SEQ_LEN + 1):
            seq[:, t] = cur
            u = rng.random(n)
            pick = (u[:, None] > np.cumsum(probs[cur], axis=1)).sum(axis=1).clip(0, 5)
            nxt = succ[cur, pick]
            noise = rng.random(n) < 0.1
            cur = np.where(noise, rng.choice(chars, size=n), nxt)
        short = rng.random(n) < 1 / 3
        ends = rng.integers(SEQ_LEN // 4, SEQ_LEN, size=n)
        for i in np.flatnonzero(short):
            seq[i, ends[i]] = EOS
            seq[i, ends[i] + 1:] = PAD
        return seq

    train = draw(num_clients * per_client).reshape(num_clients, per_client, SEQ_LEN + 1)
    test = draw(TEST_SEQUENCES)
    return {"x_clients": train[..., :-1], "y_clients": train[..., 1:],
            "x_test": test[:, :-1], "y_test": test[:, 1:]}


class NpzClients:
    """The population (``num_clients``, ``client(cid)``); holds the arrays, so it
    pickles to fedsim's actors (1,000 x 4 x 80 int32 x 2: 2.6 MB)."""

    def __init__(self, path: os.PathLike | str) -> None:
        with np.load(path) as npz:
            self.x = npz["x_clients"].astype(np.int32)
            self.y = npz["y_clients"].astype(np.int32)
            self.x_test = npz["x_test"].astype(np.int32)
            self.y_test = npz["y_test"].astype(np.int32)

    @property
    def num_clients(self) -> int:
        return int(self.x.shape[0])

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[cid], self.y[cid]


def cohort(seed: int, rnd: int, population: int, per_round: int) -> np.ndarray:
    """Round ``rnd``'s clients, exactly as fedsim's server samples them."""
    from fedsim.cohort.sampling import sample_clients
    from fedsim.rng import STREAM_SAMPLING, stream

    return sample_clients(population, per_round, "uniform", stream(seed, STREAM_SAMPLING, rnd))


def evaluate(model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Masked mean token loss and token accuracy (pad labels not counted), the
    same function for both systems' final weights."""
    import tensorflow as tf

    from fedsim.tasks.next_token import MaskedTokenAccuracy, sequence_crossentropy

    loss_sum = loss_n = hit = count = 0.0
    acc = MaskedTokenAccuracy((PAD,))
    for i in range(0, len(x), 100):
        logits = model(tf.constant(x[i:i + 100]), training=False)
        s, n = sequence_crossentropy(y[i:i + 100], logits)
        h, c = acc(y[i:i + 100], logits)
        loss_sum += float(tf.reduce_sum(s))
        loss_n += float(tf.reduce_sum(n))
        hit += float(tf.reduce_sum(h))
        count += float(tf.reduce_sum(c))
    return {"test_loss": loss_sum / loss_n, "test_token_accuracy": hit / count}


def build_model(seed: int):
    from fedsim.models.char_lstm import build

    return build((SEQ_LEN,), VOCAB, seed)


def _timed(round_seconds: list[float], warmup: int, cpr: int) -> dict[str, Any]:
    timed = round_seconds[warmup:]
    return {"round_seconds": timed, "warmup_round_seconds": round_seconds[:warmup],
            "mean_round_seconds": float(np.mean(timed)),
            "updates_per_s": cpr * len(timed) / float(np.sum(timed))}


# ---------------------------------------------------------------------------- fedsim
def run_fedsim(a: argparse.Namespace, clients: NpzClients) -> dict[str, Any]:
    import tempfile

    from fedsim.config import ClientConfig, RayConfig, ServerConfig, SimConfig
    from fedsim.data.base import FederatedData
    from fedsim.models.char_lstm import build
    from fedsim.models.keras import FlatWeights
    from fedsim.simulation import run_simulation
    from fedsim.tasks.next_token import NextTokenPrediction

    rounds = a.warmup + a.rounds
    cfg = SimConfig(
        clients=clients.num_clients, clients_per_round=a.clients_per_round, rounds=rounds,
        local_epochs=LOCAL_EPOCHS, batch_size=BATCH_SIZE, eval_every=10**6,
        seed=a.seed, progress=False, checkpoint_every=0,
        client=ClientConfig(learning_rate=CLIENT_LR),
        server=ServerConfig(learning_rate=SERVER_LR, weighting="uniform"),
        ray=RayConfig(num_cpus=a.cpus, workers="auto"))
    if a.fedsim_loss == "tff":  # TFF 0.87's actual loss: every position, padding included
        cfg.model.loss = "sparse_categorical_crossentropy"
    data = FederatedData(clients, clients.x_test, clients.y_test, num_classes=VOCAB,
                         input_shape=(SEQ_LEN,), name="synthetic_shakespeare",
                         task=NextTokenPrediction(pad=PAD))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = run_simulation(cfg, Path(out) / "run", data=data, model=build)
    wall = time.perf_counter() - t0
    rows, summary = result.metrics, result.summary
    res = _timed([r["round_seconds"] for r in rows], a.warmup, a.clients_per_round)
    model = build_model(a.seed)
    import tensorflow as tf

    FlatWeights(model.trainable_variables).assign(tf.constant(result.weights))
    res.update(evaluate(model, clients.x_test, clients.y_test),
               train_loss_last_round=rows[-1].get("train_loss"),
               fedsim_final=summary.get("final"),
               workers=len(summary.get("memory_mib", {}).get("workers", [])) or None,
               wall_seconds_in_process=wall,
               cohorts=[[int(c) for c in cohort(a.seed, r, clients.num_clients,
                                                a.clients_per_round)[:5]]
                        for r in range(1, rounds + 1)],
               version=summary.get("versions", {}).get("fedsim"))
    return res


# ---------------------------------------------------------------------------- TFF
def run_tff(a: argparse.Namespace, clients: NpzClients) -> dict[str, Any]:
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedsim.interop.tff import stop_tff_worker_binaries

    spec = (tf.TensorSpec([None, SEQ_LEN], tf.int32), tf.TensorSpec([None, SEQ_LEN], tf.int32))

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_model(a.seed), input_spec=spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    process = tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=CLIENT_LR),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=SERVER_LR),
        model_aggregator=tff.aggregators.UnweightedMeanFactory())
    t_setup = time.perf_counter()
    state = process.initialize()
    init = build_model(a.seed)  # fedsim's initial weights (its server builds with cfg.seed)
    state = process.set_model_weights(state, tff.learning.models.ModelWeights(
        trainable=[v.numpy() for v in init.trainable_variables], non_trainable=[]))
    setup = time.perf_counter() - t_setup
    round_seconds, data_seconds, next_seconds, train_loss = [], [], [], None
    rounds = a.warmup + a.rounds
    try:
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            datasets = []
            for cid in cohort(a.seed, rnd, clients.num_clients, a.clients_per_round):
                x, y = clients.client(int(cid))
                datasets.append(tf.data.Dataset.from_tensor_slices((x, y))
                                .shuffle(len(y), seed=int(cid) + 1000 * rnd)
                                .batch(BATCH_SIZE))
            t1 = time.perf_counter()
            out = process.next(state, datasets)
            state = out.state
            t2 = time.perf_counter()
            round_seconds.append(t2 - t0)
            data_seconds.append(t1 - t0)
            next_seconds.append(t2 - t1)
            try:
                train_loss = float(out.metrics["client_work"]["train"]["loss"])
            except (KeyError, TypeError):
                pass
        weights = process.get_model_weights(state)
    finally:
        stop_tff_worker_binaries()
    for v, value in zip(init.trainable_variables, weights.trainable):
        v.assign(value)
    res = _timed(round_seconds, a.warmup, a.clients_per_round)
    res.update(evaluate(init, clients.x_test, clients.y_test),
               train_loss_last_round=train_loss, setup_seconds=setup,
               breakdown={"client_datasets_seconds": float(np.mean(data_seconds[a.warmup:])),
                          "process_next_seconds": float(np.mean(next_seconds[a.warmup:]))},
               version=tff.__version__)
    return res


# ---------------------------------------------------------------------------- harness
def run_one(system: str, a: argparse.Namespace, data: Path) -> dict[str, Any]:
    out = a.out / f"{system}.json"
    log = a.out / f"{system}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--system", system,
           "--data", str(data), "--result", str(out),
           "--clients-per-round", str(a.clients_per_round), "--rounds", str(a.rounds),
           "--warmup", str(a.warmup), "--seed", str(a.seed), "--cpus", str(a.cpus),
           "--fedsim-loss", a.fedsim_loss]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    print(f"== {system}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc: Any = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc == 0 and out.exists():
        res = json.loads(out.read_text())
    else:
        tail = log.read_text()[-2000:]
        res = {"error": f"exit {rc}", "log_tail": tail}
        print(tail, flush=True)
    res.update(system=system, process_wall_seconds=wall)
    print(f"   {system}: {res.get('updates_per_s', res.get('error'))} updates/s "
          f"({wall:.0f} s in all)", flush=True)
    return res


def table(results: dict[str, dict[str, Any]],
          a: argparse.Namespace) -> tuple[str, float | None]:
    f, t = results.get("fedsim", {}), results.get("tff", {})
    ratio = (f["updates_per_s"] / t["updates_per_s"]
             if "updates_per_s" in f and "updates_per_s" in t else None)

    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        v = r.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) else (r.get("error") or "-")

    lines = [
        f"char LSTM (820,522 params), {a.clients} clients x {a.examples_per_client} sequences "
        f"of {SEQ_LEN}, {a.clients_per_round} clients/round, batch {BATCH_SIZE}, "
        f"{LOCAL_EPOCHS} epoch, client/server SGD lr {CLIENT_LR}/{SERVER_LR}, "
        f"{a.cpus} CPUs, {a.warmup} warmup + {a.rounds} timed rounds",
        "",
        "| system | client updates/s | s/round (timed) | warmup s/round | test loss | "
        "test token acc | version |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in (("fedsim (Ray actors)", f), ("TFF simulation", t)):
        warm = r.get("warmup_round_seconds") or []
        lines.append(
            f"| {name} | {cell(r, 'updates_per_s', '.2f')} | "
            f"{cell(r, 'mean_round_seconds', '.2f')} | "
            f"{(', '.join(f'{w:.1f}' for w in warm) or '-')} | "
            f"{cell(r, 'test_loss', '.4f')} | {cell(r, 'test_token_accuracy', '.4f')} | "
            f"{r.get('version', '-')} |")
    lines += ["", f"**fedsim / TFF (client updates per second): "
              f"{'-' if ratio is None else f'{ratio:.2f}x'}**"
              + ("" if ratio is None else f" (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")]
    lines += ["", "Test loss/accuracy: the masked token loss and token accuracy (pad labels not "
              "counted) of each system's final weights, evaluated the same way. TFF's own "
              "training loss is unmasked (the Keras mask is lost inside TFF's computation); "
              f"fedsim trained with --fedsim-loss {a.fedsim_loss} (tff: the same unmasked "
              "objective); see the module docstring."]
    return "\n".join(lines) + "\n", ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients-per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--examples-per-client", type=int, default=4)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs for fedsim")
    ap.add_argument("--systems", nargs="+", choices=["fedsim", "tff"], default=["fedsim", "tff"])
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per system")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "char_lstm")
    ap.add_argument("--fedsim-loss", choices=["tff", "masked"], default="tff",
                    help="fedsim's training loss: TFF 0.87's unmasked mean over every position "
                         "(the same objective as TFF's run) or fedsim's default masked mean")
    ap.add_argument("--system", choices=["fedsim", "tff"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.system:  # one system, in this (child) process
        clients = NpzClients(a.data)
        res = (run_fedsim if a.system == "fedsim" else run_tff)(a, clients)
        Path(a.result).write_text(json.dumps(res, indent=1, default=float))
        return

    a.out.mkdir(parents=True, exist_ok=True)
    data = a.out / "clients.npz"
    np.savez_compressed(data, **generate(a.clients, a.examples_per_client, a.seed))
    results = {s: run_one(s, a, data) for s in a.systems}
    md, ratio = table(results, a)
    (a.out / "results.json").write_text(json.dumps(
        {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                    if k not in ("system", "data", "result")},
         "ratio_fedsim_over_tff": ratio, "results": results}, indent=1, default=float))
    (a.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""The fixed workload of ``compare_simulators.py``, shared by every simulator's runner.

Imported by runners in fedsim's venv AND in the Flower venv, so it needs only
numpy, psutil and (for the model) TensorFlow; the Keras model comes from
``fedsim.models.keras.build_model`` (pure Python + TF; the repository root is put on
``sys.path``), so every simulator trains the very same architecture from the
very same initial weights.

Workload: 1,000 clients of 50 MNIST-shaped (28x28x1) examples, 10 classes,
generated from a seed (no download): each class has a random low-frequency
template, an image is ``0.5 * template + 0.5 * uniform noise`` stored as uint8
(like MNIST) and read as ``uint8 / 255``. 1 local epoch, batch 10, client SGD
lr 0.05 (no momentum), server SGD lr 1.0 (plain FedAvg, clients weighted
equally; all clients hold 50 examples so example weighting is the same).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NUM_CLIENTS = 1000
EXAMPLES_PER_CLIENT = 50
TEST_EXAMPLES = 2000
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
BATCH_SIZE = 10
LOCAL_EPOCHS = 1
CLIENT_LR = 0.05
SERVER_LR = 1.0
MODEL_SEED = 0

# ~100k parameters each: cnn 98,442 (3x3 convs of 16, 32, 64 filters, each with
# 2x2 max pooling, then dense 128 and 10); mlp 101,770 (784 -> 128 -> 10).
MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"name": "cnn", "filters": [16, 32, 64]},
    "mlp": {"name": "mlp", "hidden": [128]},
}
# Central DP as TFF's DifferentiallyPrivateFactory.gaussian_fixed: every client
# update clipped to L2 norm 1.0, Gaussian noise of std 1.0 * 1.0 on the sum,
# divided by clients_per_round.
DP: dict[str, dict[str, float] | None] = {
    "none": None,
    "gaussian": {"l2_norm_clip": 1.0, "noise_multiplier": 1.0},
}


def add_run_arguments(ap: Any) -> None:
    """The options every runner takes: model, dp, cohort size, rounds, seed, CPUs."""
    ap.add_argument("--model", choices=sorted(MODELS), default="cnn")
    ap.add_argument("--dp", choices=sorted(DP), default="none")
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)


def model_config(model: str):
    from fedsim.config import ModelConfig

    return ModelConfig(**MODELS[model])


def build_keras_model(model: str):
    """The model fedsim builds for ``model``, with fedsim's seeded initial weights."""
    from fedsim.models.keras import build_model

    return build_model(model_config(model), IMAGE_SHAPE, NUM_CLASSES, MODEL_SEED)


def generate(seed: int = 0) -> dict[str, np.ndarray]:
    """Keras-``mnist.npz``-shaped arrays: uint8 images ``(n, 28, 28)``, uint8 labels."""
    rng = np.random.default_rng([seed, 0x574B])
    coarse = rng.random((NUM_CLASSES, 7, 7))
    templates = np.kron(coarse, np.ones((4, 4)))  # (10, 28, 28), low frequency

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, NUM_CLASSES, size=n)
        x = 0.5 * templates[y] + 0.5 * rng.random((n, 28, 28))
        return np.round(x * 255).astype(np.uint8), y.astype(np.uint8)

    x_train, y_train = draw(NUM_CLIENTS * EXAMPLES_PER_CLIENT)
    x_test, y_test = draw(TEST_EXAMPLES)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def as_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``(n, 28, 28)`` -> float32 ``(n, 28, 28, 1)``, as fedsim reads mnist.npz."""
    return (np.asarray(images, np.float32) / np.float32(255.0))[..., None]


class Clients:
    """Every client's examples (``clients.npz``: the split fedsim itself uses)."""

    def __init__(self, path: os.PathLike | str) -> None:
        with np.load(path) as npz:
            self.x = npz["x_clients"]          # uint8 (clients, 50, 28, 28)
            self.y = npz["y_clients"].astype(np.int32)
            self.x_test = as_float(npz["x_test"])
            self.y_test = npz["y_test"].astype(np.int32)

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        return as_float(self.x[cid]), self.y[cid]


def cohort(seed: int, rnd: int, clients_per_round: int) -> np.ndarray:
    """The clients of round ``rnd`` (uniform, without replacement)."""
    rng = np.random.default_rng([seed, 0xC0407, rnd])
    return np.sort(rng.choice(NUM_CLIENTS, clients_per_round, replace=False))


def clip_and_noise(deltas: list[np.ndarray], dp: dict[str, float] | None,
                   rng: np.random.Generator) -> np.ndarray:
    """Mean of ``deltas``, or TFF's gaussian_fixed: clip each, sum, noise, / n."""
    if dp is None:
        return np.mean(deltas, axis=0)
    clip, z = dp["l2_norm_clip"], dp["noise_multiplier"]
    total = np.zeros_like(deltas[0], dtype=np.float64)
    for d in deltas:
        total += d * min(1.0, clip / max(float(np.linalg.norm(d)), 1e-12))
    total += rng.normal(scale=z * clip, size=total.shape)
    return (total / len(deltas)).astype(np.float32)


def accuracy(keras_model, x: np.ndarray, y: np.ndarray) -> float:
    logits = keras_model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


class PeakMemory:
    """Samples resident memory (MiB) of this process and of its descendants.

    Sampled, because ``getrusage``'s ``ru_maxrss`` survives ``execve`` on Linux:
    a runner started from a large parent would report the parent's peak.

    ``groups`` maps a label to a predicate on a child ``psutil.Process``; the
    peak of the summed RSS of the matching children is kept per label.
    """

    def __init__(self, groups: dict[str, Any] | None = None, every: float = 0.25) -> None:
        import psutil

        self._me = psutil.Process()
        self.groups = groups or {}
        self.peak = {label: 0.0 for label in self.groups}
        self.peak_self = 0.0
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.peak_self = max(self.peak_self, self._me.memory_info().rss / 2**20)
                children = self._me.children(recursive=True)
            except psutil.Error:
                children = []
            sums = dict.fromkeys(self.groups, 0.0)
            for child in children:
                try:
                    for label, match in self.groups.items():
                        if match(child):
                            sums[label] += child.memory_info().rss / 2**20
                except psutil.Error:
                    pass
            for label, value in sums.items():
                self.peak[label] = max(self.peak[label], value)
            self._stop.wait(self._every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_self = max(self.peak_self, self._me.memory_info().rss / 2**20)



def name_is(*names: str):
    """A PeakMemory predicate: the child's process name or command line matches."""
    def match(proc) -> bool:
        try:
            text = proc.name() + " " + " ".join(proc.cmdline()[:1])
        except Exception:  # noqa: BLE001 - process vanished
            return False
        return any(n in text for n in names)
    return match


def now() -> float:
    return time.perf_counter()

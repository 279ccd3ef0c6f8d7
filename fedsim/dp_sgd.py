"""Example-level DP-SGD (Abadi et al. 2016) inside clients, and its accounting.

Three parts:

* **Accounting** (:func:`dp_sgd_event`, :func:`dp_sgd_epsilon`,
  :func:`client_example_epsilon`): the DpEvent of DP-SGD exactly as TF
  Privacy 0.9's ``compute_dp_sgd_privacy_statement`` builds it (its line
  "Epsilon assuming Poisson sampling"), composed by dp-accounting.
* **Training** (:class:`DPSGDTrainer`): a drop-in alternative to
  :class:`fedsim.client.LocalTrainer` whose every step is TF Privacy's DP Keras
  SGD optimizer: per-microbatch gradients clipped to L2 norm ``l2_norm_clip``,
  summed, Gaussian noise of std ``noise_multiplier * l2_norm_clip`` added to the
  sum, divided by the number of microbatches. All steps of a client run in ONE
  compiled call, and the noise is a pure function of the client's ``rng``.
* **The TF Privacy tutorial, centrally** (:func:`train_central`), which
  ``scripts/dp_sgd.py`` runs on MNIST or on fedsim's bundled digits.

Adjacency is add-or-remove-one-example throughout, as in TF Privacy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_privacy
from dp_accounting import DpEvent
from tensorflow_privacy.privacy.dp_query import gaussian_query

from fedsim.client import ClientResult, epoch_order
from fedsim.config import ACCOUNTANTS, ClientConfig, ModelConfig
from fedsim.errors import ConfigError
from fedsim.models import FlatWeights, build_model

# --------------------------------------------------------------------------- accounting


def _check_dp_sgd_args(num_examples: int, batch_size: int, noise_multiplier: float,
                       epochs: float) -> None:
    if not (isinstance(num_examples, (int, np.integer)) and num_examples >= 1):
        raise ConfigError("num_examples", "an integer >= 1", num_examples)
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ConfigError("batch_size", "an integer >= 1", batch_size)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError("noise_multiplier", "a finite number >= 0", noise_multiplier)
    if not (math.isfinite(epochs) and epochs > 0):
        raise ConfigError("epochs", "a finite number > 0", epochs)


def dp_sgd_event(num_examples: int, batch_size: int, noise_multiplier: float, epochs: float,
                 *, used_microbatching: bool = False) -> DpEvent:
    """The DpEvent of ``epochs`` epochs of DP-SGD over ``num_examples`` examples.

    Exactly TF Privacy 0.9's event (``compute_dp_sgd_privacy_lib.
    _compute_dp_sgd_example_privacy`` with Poisson subsampling, as used by
    ``compute_dp_sgd_privacy_statement``)::

        q = batch_size / num_examples          (sampling probability of a step)
        steps = ceil(epochs / q)
        SelfComposed(PoissonSampled(q, Gaussian(z)), steps)

    where z = noise_multiplier, or noise_multiplier / 2 when
    ``used_microbatching`` (microbatches of more than one example: adding or
    removing one example moves a clipped microbatch gradient by up to
    2 * l2_norm_clip, so the sensitivity doubles; TF Privacy's
    ``used_microbatching``). One microbatch per example is NOT microbatching.

    Assumption (TF Privacy's): each step's batch is a Poisson sample (every
    example independently with probability q). Pipelines that shuffle and
    cut fixed-size batches, as fedsim does, are commonly reported with this
    number; with an arbitrary data order the guarantee is weaker.

    When ``batch_size > num_examples`` (a client smaller than one batch) q is
    capped at 1: every step sees every example (full-batch gradient descent,
    no amplification by sampling); TF Privacy's formula would give q > 1.
    """
    _check_dp_sgd_args(num_examples, batch_size, noise_multiplier, epochs)
    q = min(batch_size / num_examples, 1.0)
    z = noise_multiplier / 2 if used_microbatching else noise_multiplier
    steps = int(math.ceil(epochs / q))
    return dp_accounting.SelfComposedDpEvent(
        count=steps,
        event=dp_accounting.PoissonSampledDpEvent(
            sampling_probability=q, event=dp_accounting.GaussianDpEvent(z)))


def _accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    if kind == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if kind == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ConfigError("accountant", "one of " + ", ".join(ACCOUNTANTS), kind)


def _epsilon(event: DpEvent, noise_multiplier: float, delta: float, accountant: str) -> float:
    if not 0 < delta < 1:
        raise ConfigError("delta", "a number in (0, 1)", delta)
    acct = _accountant(accountant)
    if noise_multiplier == 0:
        return math.inf  # no noise: no finite guarantee (dp-accounting would divide by 0)
    return float(acct.compose(event).get_epsilon(delta))


def dp_sgd_epsilon(num_examples: int, batch_size: int, noise_multiplier: float,
                   epochs: float, delta: float, accountant: str = "rdp",
                   *, used_microbatching: bool = False) -> float:
    """Example-level epsilon at ``delta`` of DP-SGD (:func:`dp_sgd_event`).

    accountant: ``rdp`` (dp-accounting's RdpAccountant with its default orders,
    as TF Privacy's statement uses) or ``pld`` (PLDAccountant). Equals the
    "Epsilon assuming Poisson sampling" of TF Privacy 0.9's
    ``compute_dp_sgd_privacy_statement``; e.g. the tutorial's MNIST run
    (60,000 examples, batch 250, noise 1.3, 3 epochs, delta 1e-5) gives 0.563.
    Returns ``inf`` when ``noise_multiplier`` is 0.
    """
    event = dp_sgd_event(num_examples, batch_size, noise_multiplier, epochs,
                         used_microbatching=used_microbatching)
    return _epsilon(event, noise_multiplier, delta, accountant)


def client_example_epsilon(num_examples: int, batch_size: int, noise_multiplier: float,
                           local_epochs: float, participations: int, delta: float,
                           accountant: str = "rdp", *,
                           used_microbatching: bool = False) -> float:
    """Example-level epsilon of one client's DP-SGD over all its rounds.

    The client took part in ``participations`` rounds; in each it ran
    ``local_epochs`` epochs of DP-SGD on its ``num_examples`` examples
    (:func:`dp_sgd_event`), so the per-round events compose
    ``participations`` times (adaptively: each round starts from a model that
    depends on earlier releases). This bounds what the client's released
    updates reveal about any one of its examples, whatever the server does
    with them; it is not a user-level guarantee.

    Assumption (as TF Privacy's statement): every DP-SGD step's batch is a
    Poisson sample of the client's examples with probability
    ``batch_size / num_examples`` (capped at 1). fedsim shuffles the examples
    each epoch and cuts fixed-size batches, for which this is the customary,
    not a proven, figure. ``used_microbatching``: microbatches hold more than
    one example (sensitivity doubles). Returns 0 for 0 participations and
    ``inf`` without noise.
    """
    if not (isinstance(participations, (int, np.integer)) and participations >= 0):
        raise ConfigError("participations", "an integer >= 0", participations)
    if participations == 0:
        if not 0 < delta < 1:
            raise ConfigError("delta", "a number in (0, 1)", delta)
        _check_dp_sgd_args(num_examples, batch_size, noise_multiplier, local_epochs)
        return 0.0
    round_event = dp_sgd_event(num_examples, batch_size, noise_multiplier, local_epochs,
                               used_microbatching=used_microbatching)
    event = dp_accounting.SelfComposedDpEvent(round_event, int(participations))
    return _epsilon(event, noise_multiplier, delta, accountant)


# --------------------------------------------------------------------------- training


class SeededGaussianSumQuery(gaussian_query.GaussianSumQuery):
    """TF Privacy's ``GaussianSumQuery`` whose noise comes from a stateless RNG.

    Clipping, summing and the reported DpEvent are the parent's; only
    ``get_noised_result`` differs: leaf ``i`` of the summed record gets
    ``stddev * tf.random.stateless_normal(shape, fold_in(step_seed, i))``
    (Philox), where ``step_seed`` is an int64 ``[2]`` tensor set with
    :meth:`seeded` around each optimizer step. The parent draws from TF's
    stateful global RNG instead, which cannot be replayed without global state.
    Asking for noise outside :meth:`seeded` raises, so no step can silently
    fall back to an unseeded stream.
    """

    def __init__(self, l2_norm_clip: float, stddev: float) -> None:
        super().__init__(l2_norm_clip, stddev)
        self._step_seed: Optional[tf.Tensor] = None

    def seeded(self, step_seed: tf.Tensor) -> "_SeedScope":
        """Context in which ``get_noised_result`` draws from ``step_seed``."""
        return _SeedScope(self, step_seed)

    def get_noised_result(self, sample_state, global_state):
        if self._step_seed is None:
            raise RuntimeError("SeededGaussianSumQuery: noise requested without a step seed "
                               "(wrap the optimizer step in query.seeded(seed))")
        leaves = tf.nest.flatten(sample_state)
        noised = [
            v + tf.random.stateless_normal(
                tf.shape(v), seed=tf.random.experimental.stateless_fold_in(self._step_seed, i),
                stddev=tf.cast(global_state.stddev, v.dtype), dtype=v.dtype)
            for i, v in enumerate(leaves)
        ]
        result = tf.nest.pack_sequence_as(sample_state, noised)
        noise_multiplier = global_state.stddev / global_state.l2_norm_clip
        return result, global_state, dp_accounting.GaussianDpEvent(noise_multiplier)


class _SeedScope:
    def __init__(self, query: SeededGaussianSumQuery, seed: tf.Tensor) -> None:
        self.query, self.seed = query, seed

    def __enter__(self) -> None:
        self.query._step_seed = self.seed

    def __exit__(self, *exc: object) -> None:
        self.query._step_seed = None


class MicrobatchJacobianTape:
    """What TF Privacy's DP Keras optimizers need from a ``tf.GradientTape``,
    with the jacobian already computed.

    ``GenericDPSGDOptimizer._compute_gradients(loss, var_list, tape=...)``
    (TF Privacy 0.9) enters the tape, reshapes ``loss`` into microbatch losses
    and asks ``tape.jacobian(microbatch_losses, var_list)`` for their
    gradients, row j = gradient of microbatch j's mean loss. This object
    returns ``grads`` (one ``[k, *var.shape]`` tensor per variable, in
    ``var_list`` order) for that call, computed per microbatch by
    :meth:`DPSGDTrainer._microbatch_grads`.
    """

    def __init__(self, grads: Sequence[tf.Tensor]) -> None:
        self._grads = list(grads)

    def __enter__(self) -> "MicrobatchJacobianTape":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def watch(self, tensor: object) -> None:
        """Nothing to record: the gradients are given."""

    def jacobian(self, target: tf.Tensor, sources: Sequence[tf.Variable],
                 unconnected_gradients: object = None, **_: object) -> list[tf.Tensor]:
        sources = tf.nest.flatten(sources)
        if len(sources) != len(self._grads):
            raise ValueError(f"jacobian asked for {len(sources)} variables, "
                             f"{len(self._grads)} gradients given")
        return self._grads


def microbatch_size(batch_size: int, num_microbatches: Optional[int]) -> int:
    """Examples per microbatch: ``batch_size / num_microbatches`` (1 for None).

    Raises :class:`ConfigError` unless ``num_microbatches`` divides
    ``batch_size`` (TF Privacy's requirement: "The number of microbatches
    should evenly divide the batch size").
    """
    if num_microbatches is None:
        return 1
    if not (1 <= num_microbatches <= batch_size and batch_size % num_microbatches == 0):
        raise ConfigError("client.num_microbatches", f"a divisor of batch_size={batch_size} "
                          "(or null: one per example)", num_microbatches)
    return batch_size // num_microbatches


class DPSGDTrainer:
    """Trains clients with DP-SGD: TF Privacy's DP Keras SGD optimizer.

    Same interface as :class:`fedsim.client.LocalTrainer`: ``train(global_weights,
    x, y, rng)`` returns ``delta = global - local``, the client's number of
    examples and its mean training loss. Each step, on a batch of ``b``
    examples split into ``k`` microbatches of ``m`` consecutive examples::

        g_j  = gradient of the mean loss of microbatch j, clipped to L2 norm C
        grad = (sum_j g_j + N(0, (z * C)^2 I)) / k         (TF Privacy's step)
        w   <- w - lr * grad                                (with momentum: as Keras SGD)

    with C = ``client_cfg.l2_norm_clip``, z = ``client_cfg.noise_multiplier``,
    lr = ``client_cfg.learning_rate``, momentum ``client_cfg.momentum`` (reset
    for every client, as LocalTrainer). The optimizer is
    ``tensorflow_privacy.GenericDPSGDOptimizer`` with a Gaussian sum query of
    clip C and std z * C, i.e. exactly what ``DPKerasSGDOptimizer(C, z, ...)``
    builds, except that the query draws its noise from a seeded stateless RNG
    (:class:`SeededGaussianSumQuery`). The loss is computed per example
    (reduction NONE), as the tutorial requires; the optimizer gets one entry
    per microbatch (the mean over its examples, as TF Privacy's reshape to
    ``[k, -1]`` forms it) and is built with ``num_microbatches=None``.

    Speed: the optimizer takes the per-microbatch gradients as the jacobian of
    the microbatch losses from the tape it is given. A real tape computes that
    jacobian by vectorizing the backward pass of the whole batch once per
    microbatch, O(k * b) work (19 s a step for the tutorial CNN at batch 250
    on 2 cores). DPSGDTrainer instead computes each microbatch's gradient on
    its own examples with ``tf.vectorized_map`` (O(b), 0.1 s) and hands the
    stack to the optimizer through :class:`MicrobatchJacobianTape`; clipping,
    noise, averaging and the update stay TF Privacy's (tested equal to the stock
    ``DPKerasSGDOptimizer``). This is exact for models without cross-example
    layers (no batch normalization), as all fedsim models are.

    Microbatches: ``client_cfg.num_microbatches`` per full batch, so
    m = batch_size / num_microbatches examples per microbatch (it must divide
    the batch size); None means one example per microbatch. Every microbatch
    holds exactly m examples: the short last batch of an epoch (n % batch_size
    examples) is cut down to a multiple of m and split into that many
    microbatches of m, so at most m - 1 examples per epoch are skipped (none
    with one example per microbatch, and different ones each epoch because
    of the reshuffle); TF Privacy would refuse a batch that its microbatch
    count does not divide.

    Randomness: the examples are shuffled with ``epoch_order(len(x),
    local_epochs, rng)`` (as LocalTrainer, so both see the same batches), then
    a noise key (two 63-bit integers) is drawn from ``rng``. Step s's noise
    depends only on (key, s, variable): the same rng state and inputs give
    bit-identical deltas, whichever client was trained before. All steps run
    in one ``tf.function`` call, traced once (input signature with None dims).

    Privacy: :func:`client_example_epsilon` with ``used_microbatching=
    self.used_microbatching`` gives a client's example-level epsilon.
    """

    def __init__(self, model_cfg: ModelConfig, client_cfg: ClientConfig,
                 input_shape: Sequence[int], num_classes: int, batch_size: int,
                 local_epochs: int, seed: int = 0, *,
                 model: Optional[tf.keras.Model] = None) -> None:
        """model: train this Keras model (logits out) instead of building
        ``model_cfg``'s; for the tutorial's CNN (:func:`tutorial_cnn`)."""
        self.model = model if model is not None else build_model(
            model_cfg, input_shape, num_classes, seed)
        self.flat = FlatWeights(self.model.trainable_variables)
        self.batch_size = int(batch_size)
        self.local_epochs = int(local_epochs)
        self.l2_norm_clip = float(client_cfg.l2_norm_clip)
        self.noise_multiplier = float(client_cfg.noise_multiplier)
        self.microbatch_size = microbatch_size(self.batch_size, client_cfg.num_microbatches)
        self._query = SeededGaussianSumQuery(self.l2_norm_clip,
                                             self.l2_norm_clip * self.noise_multiplier)
        self._momentum = float(client_cfg.momentum)
        self._opt = tensorflow_privacy.GenericDPSGDOptimizer(
            dp_sum_query=self._query, num_microbatches=None,
            learning_rate=client_cfg.learning_rate, momentum=self._momentum)
        # Create the optimizer's variables now (not inside the first trace), so
        # the momentum slots can be reset at the start of every client.
        self._opt._create_all_weights(self.model.trainable_variables)
        self._loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
        x_spec = tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32)
        self._train = tf.function(
            self._train_graph, autograph=False,
            input_signature=[tf.TensorSpec([None], tf.float32), x_spec,
                             tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32),
                             tf.TensorSpec([2], tf.int64)])

    @property
    def num_parameters(self) -> int:
        return self.flat.size

    @property
    def used_microbatching(self) -> bool:
        """Whether microbatches hold more than one example (TF Privacy's
        ``used_microbatching``: the add/remove sensitivity doubles)."""
        return self.microbatch_size > 1

    def steps_per_epoch(self, num_examples: int) -> int:
        """DP-SGD steps per epoch on ``num_examples`` examples (full batches,
        plus the short last batch if it holds at least one microbatch)."""
        full, rest = divmod(int(num_examples), self.batch_size)
        return full + int(rest >= self.microbatch_size)

    def _microbatch_grads(self, xb: tf.Tensor, yb: tf.Tensor
                          ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Per-microbatch (loss sums ``[k]``, gradients of the mean losses
        ``[k, *var.shape]`` per variable) for a batch of k * m examples."""
        m = self.microbatch_size
        variables = self.model.trainable_variables
        xm = tf.reshape(xb, tf.concat([[-1, m], tf.shape(xb)[1:]], axis=0))
        ym = tf.reshape(yb, [-1, m])

        def one(args: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
            x1, y1 = args
            with tf.GradientTape() as tape:
                losses = self._loss_fn(y1, self.model(x1, training=True))
                mean = tf.reduce_mean(losses)
            grads = tape.gradient(mean, variables,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.reduce_sum(losses), grads

        return tf.vectorized_map(one, (xm, ym))

    def _step(self, step: tf.Tensor, x: tf.Tensor, y: tf.Tensor, order: tf.Tensor,
              key: tf.Tensor, n: tf.Tensor, steps_per_epoch: tf.Tensor
              ) -> tuple[tf.Tensor, tf.Tensor]:
        """One DP-SGD step; returns (sum of per-example losses, examples used)."""
        bs, m = self.batch_size, self.microbatch_size
        epoch = step // steps_per_epoch
        start = epoch * n + (step % steps_per_epoch) * bs
        size = tf.minimum(bs, (epoch + 1) * n - start)
        size = size - size % m  # whole microbatches only (short last batch)
        idx = order[start:start + size]
        loss_sums, grads = self._microbatch_grads(tf.gather(x, idx), tf.gather(y, idx))
        tape = MicrobatchJacobianTape(grads)
        with self._query.seeded(tf.random.experimental.stateless_fold_in(key, step)):
            # the per-microbatch mean losses, one "example" each for the optimizer
            self._opt.minimize(loss_sums / m, self.model.trainable_variables, tape=tape)
        return tf.reduce_sum(loss_sums), size

    def _train_graph(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                     order: tf.Tensor, key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        self.flat.assign(global_flat)
        if self._momentum > 0:
            for v in self.model.trainable_variables:
                slot = self._opt.get_slot(v, "momentum")
                slot.assign(tf.zeros_like(slot))
        n = tf.shape(x)[0]
        bs = tf.constant(self.batch_size, tf.int32)
        rest = n % bs
        steps_per_epoch = n // bs + tf.cast(rest >= self.microbatch_size, tf.int32)
        total_steps = steps_per_epoch * self.local_epochs

        def body(step, total_loss, seen):
            loss_sum, size = self._step(step, x, y, order, key, n, steps_per_epoch)
            return step + 1, total_loss + loss_sum, seen + size

        _, total_loss, seen = tf.while_loop(
            lambda step, *_: step < total_steps, body,
            [tf.constant(0), tf.constant(0.0), tf.constant(0)])
        delta = global_flat - self.flat.get()
        return delta, total_loss / tf.cast(tf.maximum(seen, 1), tf.float32)

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray,
              rng: np.random.Generator) -> ClientResult:
        """Train one client from ``global_weights`` with DP-SGD.

        ``rng`` shuffles the examples (as LocalTrainer), then gives the noise
        key. loss: mean per-example training loss over the examples the steps
        used (NaN if the client holds fewer than one microbatch of examples,
        in which case it takes no step and delta is zero).
        """
        order = epoch_order(len(x), self.local_epochs, rng)
        key = rng.integers(0, np.iinfo(np.int64).max, size=2, dtype=np.int64)
        delta, loss = self._train(global_weights, x, y, order, key)
        loss = float(loss) if self.steps_per_epoch(len(x)) > 0 else math.nan
        return ClientResult(delta=delta.numpy(), num_examples=int(len(x)), loss=loss)


# --------------------------------------------------------------------------- the tutorial


def tutorial_cnn(input_shape: Sequence[int], num_classes: int, seed: int) -> tf.keras.Model:
    """The TF Privacy tutorial's MNIST CNN (logits out), seeded per layer:

    Conv2D(16, 8, strides 2, same, relu) -> MaxPool2D(2, 1) -> Conv2D(32, 4,
    strides 2, valid, relu) -> MaxPool2D(2, 1) -> Flatten -> Dense(32, relu)
    -> Dense(num_classes).
    """
    seeds = iter(np.random.SeedSequence([seed, 0x7475]).generate_state(8))

    def init() -> tf.keras.initializers.Initializer:
        return tf.keras.initializers.GlorotUniform(seed=int(next(seeds)) & 0x7FFFFFFF)

    L = tf.keras.layers
    return tf.keras.Sequential([
        tf.keras.Input(shape=tuple(input_shape)),
        L.Conv2D(16, 8, strides=2, padding="same", activation="relu", kernel_initializer=init()),
        L.MaxPool2D(2, 1),
        L.Conv2D(32, 4, strides=2, padding="valid", activation="relu",
                 kernel_initializer=init()),
        L.MaxPool2D(2, 1),
        L.Flatten(),
        L.Dense(32, activation="relu", kernel_initializer=init()),
        L.Dense(num_classes, kernel_initializer=init()),
    ], name="tutorial_cnn")


@dataclass(frozen=True)
class CentralData:
    """A centralized train/test split. x: float32 ``(n, *input_shape)``, y: int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str


def load_central(mnist_path: Optional[str], seed: int = 0) -> CentralData:
    """MNIST from a local Keras ``mnist.npz`` (never downloaded), or fedsim's
    bundled digits (its seeded 80/20 split) when ``mnist_path`` is None; read
    by :func:`fedsim.data.load_federated_data` as one IID client."""
    from fedsim.config import DataConfig
    from fedsim.data import load_federated_data

    cfg = (DataConfig(name="digits", partition="iid") if mnist_path is None
           else DataConfig(name="mnist", path=mnist_path, partition="iid"))
    data = load_federated_data(cfg, clients=1, seed=seed)
    x, y = data.train.client(0)
    return CentralData(x, y, data.x_test, data.y_test, data.num_classes, data.name)


@dataclass(frozen=True)
class CentralResult:
    """Outcome of :func:`train_central`.

    accuracy: test accuracy after the last epoch. epsilon: example-level
    epsilon at ``delta`` (:func:`dp_sgd_epsilon` on the training-set size).
    history: test accuracy after each epoch. steps: DP-SGD steps taken.
    """

    accuracy: float
    epsilon: float
    delta: float
    accountant: str
    num_train: int
    num_test: int
    epochs: int
    steps: int
    seconds: float
    history: list[float] = field(default_factory=list)


def evaluate(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model``'s logits on ``(x, y)``."""
    correct = 0
    for s in range(0, len(x), batch_size):
        logits = model(x[s:s + batch_size], training=False)
        correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == y[s:s + batch_size]))
    return correct / max(len(x), 1)


def train_central(data: CentralData, client_cfg: ClientConfig, batch_size: int, epochs: int,
                  *, model: Optional[tf.keras.Model] = None,
                  model_cfg: Optional[ModelConfig] = None, accountant: str = "rdp",
                  seed: int = 0,
                  on_epoch: Optional[Callable[[int, float], None]] = None) -> CentralResult:
    """DP-SGD on a whole training set, as TF Privacy's tutorial does it.

    Trains ``model`` (or ``model_cfg``'s fedsim model, default mlp) with
    :class:`DPSGDTrainer` for ``epochs`` epochs (one compiled call per epoch,
    reshuffled each epoch from ``seed``), evaluates on the test split after
    each epoch (``on_epoch(epoch, accuracy)``), and accounts with
    :func:`dp_sgd_epsilon` at ``client_cfg.delta``.
    """
    if epochs < 1:
        raise ConfigError("epochs", "an integer >= 1", epochs)
    input_shape = data.x_train.shape[1:]
    trainer = DPSGDTrainer(model_cfg or ModelConfig(), client_cfg, input_shape,
                           data.num_classes, batch_size, local_epochs=1, seed=seed, model=model)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x647073,)))
    weights = trainer.flat.get().numpy()
    history: list[float] = []
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        result = trainer.train(weights, data.x_train, data.y_train, rng)
        weights = weights - result.delta
        trainer.flat.assign(tf.constant(weights))
        history.append(evaluate(trainer.model, data.x_test, data.y_test))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    seconds = time.perf_counter() - t0
    n = len(data.x_train)
    epsilon = dp_sgd_epsilon(n, batch_size, client_cfg.noise_multiplier, epochs,
                             client_cfg.delta, accountant,
                             used_microbatching=trainer.used_microbatching)
    return CentralResult(accuracy=history[-1], epsilon=epsilon, delta=client_cfg.delta,
                         accountant=accountant, num_train=n, num_test=len(data.x_test),
                         epochs=epochs, steps=epochs * trainer.steps_per_epoch(n),
                         seconds=seconds, history=history)

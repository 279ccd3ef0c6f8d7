"""Example-level DP-SGD (Abadi et al. 2016) inside clients, and its accounting.

Three parts:

* **Accounting** (:func:`round_event`, :func:`client_example_epsilon`, and
  TF Privacy's own figure :func:`dp_sgd_event` / :func:`dp_sgd_epsilon`): the
  DpEvent of exactly the steps a client's trainer runs, composed by
  dp-accounting, for each way of drawing batches (``client.batch_sampling``):

  - ``poisson``: every step's batch is a Poisson sample, as the trainer draws
    it: ``SelfComposed(PoissonSampled(q, Gaussian(z)), steps)``
    (:func:`poisson_round_event`, TF Privacy's "Epsilon assuming Poisson
    sampling", amplified by sampling);
  - ``shuffle``: fixed-size batches cut from a shuffle: a bound WITHOUT
    amplification by sampling, derived in :func:`shuffle_round_event`.
* **Training** (:class:`DPSGDTrainer`): a drop-in alternative to
  :class:`fedsim.client.local.LocalTrainer`. Each step clips per-microbatch
  gradients to L2 norm ``l2_norm_clip``, sums them, adds Gaussian noise of std
  ``noise_multiplier * l2_norm_clip`` to the sum and divides by a fixed
  denominator (the expected batch size for Poisson batches, the number of
  microbatches for shuffled ones, TF Privacy's optimizer). All steps of a
  client run in ONE compiled call; the noise (numpy's float64 sampler with
  exact tails, :func:`fedsim.privacy.noise.gaussian`) and the Poisson batches are pure
  functions of the client's ``rng``.
* **The TF Privacy tutorial, centrally** (:func:`train_central`), which
  ``scripts/dp_sgd.py`` runs on MNIST or on fedsim's bundled digits.

Adjacency is add-or-remove-one-example throughout, as in TF Privacy. The
sampling probability, the number of steps and the denominators are computed
from the client's number of examples n and, as in TF Privacy's and Opacus's
accounting, held fixed for the neighbouring data sets (n itself is not
protected: the client reports it).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional, Sequence

import dp_accounting
import numpy as np
import tensorflow as tf
import tensorflow_privacy
from dp_accounting import DpEvent
from tensorflow_privacy.privacy.dp_query import gaussian_query

from fedsim.client.local import ClientResult, SignatureGraph, epoch_order
from fedsim.config import ACCOUNTANTS, BATCH_SAMPLING, ClientConfig, ModelConfig
from fedsim.errors import ConfigError
from fedsim.models.keras import FlatWeights
from fedsim.models.spec import ModelSpec, as_spec, model_spec
from fedsim.privacy import noise

ASSUMPTIONS = {
    "poisson": "Poisson sampling of each step's batch, as run",
    "shuffle": "shuffled fixed-size batches: no amplification, holds for any order",
}
"""What ``privacy.example_level.assumption`` says for each ``batch_sampling``."""

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


def sampling_probability(num_examples: int, batch_size: int) -> float:
    """q = min(batch_size / num_examples, 1): the probability with which a
    Poisson step includes each example (1: every step sees every example)."""
    return min(batch_size / num_examples, 1.0)


def inclusion_probability(num_examples: int, batch_size: int) -> float:
    """The exact probability with which :class:`DPSGDTrainer`'s Poisson sampler
    includes an example: q (:func:`sampling_probability`) rounded up to a
    multiple of 2^-53.

    The sampler includes an example when a numpy float64 uniform
    ``Generator.random()`` (k * 2^-53, k uniform in [0, 2^53)) is below q,
    which happens for ceil(q * 2^53) of the 2^53 values. The result differs
    from q by less than 2^-53 and is exact in float64; the accountant is given
    this probability, so the event describes the sampler as run.
    """
    q = sampling_probability(num_examples, batch_size)
    return math.ceil(q * 2.0 ** 53) / 2.0 ** 53


def poisson_steps(num_examples: int, batch_size: int, epochs: float) -> int:
    """Steps of ``epochs`` epochs of Poisson-sampled DP-SGD: ceil(epochs / q)
    with q = min(batch_size, n) / n taken exactly (rational arithmetic), i.e.
    ceil(epochs * n / min(batch_size, n)); TF Privacy's count (e.g. 60,000
    examples, batch 250, 3 epochs: 720). TF Privacy's statement divides in
    floating point, which can land just above an integer and charge one step
    more (e.g. 49 examples, batch 1: 1 / (1 / 49) = 49.00000000000001, 50
    steps); :func:`dp_sgd_event` keeps that formula."""
    return int(math.ceil(Fraction(epochs) * int(num_examples)
                         / min(int(batch_size), int(num_examples))))


def shuffle_schedule(num_examples: int, batch_size: int, microbatch_size: int = 1
                     ) -> list[int]:
    """Microbatches in each step of one epoch of shuffled fixed-size batches.

    floor(n / batch_size) full batches of ``batch_size / microbatch_size``
    microbatches, then the short rest (n % batch_size examples) cut down to
    whole microbatches, if it holds at least one. Its length is the steps per
    epoch (:meth:`DPSGDTrainer.steps_per_epoch`).
    """
    full, rest = divmod(int(num_examples), int(batch_size))
    schedule = [batch_size // microbatch_size] * full
    if rest >= microbatch_size:
        schedule.append(rest // microbatch_size)
    return schedule


def dp_sgd_event(num_examples: int, batch_size: int, noise_multiplier: float, epochs: float,
                 *, used_microbatching: bool = False) -> DpEvent:
    """TF Privacy's DpEvent of ``epochs`` epochs of DP-SGD over ``num_examples``.

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
    example independently with probability q), which is how
    :class:`DPSGDTrainer` draws batches with ``batch_sampling=poisson``; for
    shuffled fixed-size batches see :func:`shuffle_round_event`. The
    accounting of a trainer's steps is :func:`round_event`.

    When ``batch_size > num_examples`` (a client smaller than one batch) q is
    capped at 1: every step sees every example (full-batch gradient descent,
    no amplification by sampling); TF Privacy's formula would give q > 1.
    """
    _check_dp_sgd_args(num_examples, batch_size, noise_multiplier, epochs)
    q = sampling_probability(num_examples, batch_size)
    z = noise_multiplier / 2 if used_microbatching else noise_multiplier
    return dp_accounting.SelfComposedDpEvent(
        count=int(math.ceil(epochs / q)),
        event=dp_accounting.PoissonSampledDpEvent(
            sampling_probability=q, event=dp_accounting.GaussianDpEvent(z)))


def poisson_round_event(num_examples: int, batch_size: int, noise_multiplier: float,
                        epochs: float, *, used_microbatching: bool = False) -> DpEvent:
    """The DpEvent of one round of :class:`DPSGDTrainer` with Poisson batches.

    The trainer runs ``poisson_steps(n, batch_size, epochs)`` steps; each
    includes every example independently (probability
    :func:`inclusion_probability`, q up to 2^-53), adds N(0, (z C)^2) to the
    sum of the per-example gradients clipped to C and divides by the expected
    batch size q n, a constant. Adding or removing one example moves the sum by
    at most C, and only when the example is sampled: the Poisson-subsampled
    Gaussian, composed adaptively over the steps::

        SelfComposed(PoissonSampled(q, Gaussian(z)), poisson_steps(n, b, epochs))

    That is :func:`dp_sgd_event` (TF Privacy's) with the sampler's exact q
    and the step count taken exactly.
    ``used_microbatching`` halves z as in TF Privacy's formula; the trainer
    itself refuses microbatches with Poisson batches.
    """
    _check_dp_sgd_args(num_examples, batch_size, noise_multiplier, epochs)
    z = noise_multiplier / 2 if used_microbatching else noise_multiplier
    return dp_accounting.SelfComposedDpEvent(
        count=poisson_steps(num_examples, batch_size, epochs),
        event=dp_accounting.PoissonSampledDpEvent(
            sampling_probability=inclusion_probability(num_examples, batch_size),
            event=dp_accounting.GaussianDpEvent(z)))


def shuffle_sensitivities(num_examples: int, batch_size: int, microbatch_size: int = 1
                          ) -> list[int]:
    """The L2 sensitivity of each step's clipped sum in one epoch of shuffled
    fixed-size batches, in units of ``l2_norm_clip`` C (derivation:
    :func:`shuffle_round_event`): 1 when ``microbatch_size`` is 1 and the batch
    is the whole data set (``batch_size >= num_examples``), 2 for other steps
    with one example per microbatch, ``2 * k_t`` for a step of k_t
    microbatches of more than one example."""
    schedule = shuffle_schedule(num_examples, batch_size, microbatch_size)
    if microbatch_size == 1:
        return [1 if batch_size >= num_examples else 2] * len(schedule)
    return [2 * k for k in schedule]


def shuffle_round_event(num_examples: int, batch_size: int, noise_multiplier: float,
                        epochs: float, microbatch_size: int = 1) -> DpEvent:
    """The DpEvent of one round of :class:`DPSGDTrainer` with shuffled batches:
    a bound without amplification by sampling, for exactly the steps run.

    The trainer (``batch_sampling=shuffle``) permutes the n examples uniformly
    each epoch and cuts the permutation into the steps of
    :func:`shuffle_schedule`: step t reads k_t microbatches of m =
    ``microbatch_size`` consecutive examples, adds N(0, (z C)^2) to the sum of
    the k_t clipped microbatch gradients and divides by k_t. As for Poisson
    batches, the schedule (slots and denominators) is held fixed at the
    client's n for its neighbours.

    Coupling. Let D' be D plus one example x. A uniform permutation of D' is a
    uniform permutation of D with x inserted at a uniform position j in
    {0, ..., n}; couple the two runs through (permutation, j). With these
    fixed, the batches before the one holding slot j are equal; that batch
    holds x instead of its last example, which moves to the next batch, which
    passes its own last example on, and so on to the end of the epoch, whose
    overflow falls beyond the last slot. Removing an example is the same
    coupling read backwards (the last batch may then be one example short).
    So, whatever the model, each step's clipped sum changes as under replacing
    one example (or adding or removing one):

    * one example per microbatch (m = 1): one clipped gradient leaves, one
      enters: L2 sensitivity 2C, each step is Gaussian(z / 2);
    * microbatches of m > 1 examples: the shift moves an example across every
      microbatch boundary after the insertion, so each of the step's k_t
      clipped microbatch gradients can change: 2 k_t C, Gaussian(z / (2 k_t))
      (k_t = batch_size / m for a full batch);
    * m = 1 and every step's batch is the whole data set (``batch_size >=
      n``): a step is full-batch gradient descent (every example, divided by
      n, order irrelevant), nothing shifts: the neighbour adds or removes one
      clipped gradient, sensitivity C, Gaussian(z) (the Poisson event with q =
      1).

    With the coupling fixed, a round is an adaptive composition of these
    Gaussian mechanisms over ALL its steps (``shuffle_schedule`` times
    ``epochs``; steps before the insertion are charged too, as the insertion
    point is not known). The real output distributions are mixtures, over the
    coupling, of the fixed-coupling ones; the hockey-stick divergence is
    jointly convex and the Renyi divergence jointly quasi-convex, so the
    mixtures are no further apart than the worst fixed coupling::

        Composed(SelfComposed(Gaussian(z / s), epochs * #{steps of sensitivity s C}))

    The shuffle's randomness is never used, so the bound holds for any data
    order into which the neighbour's example is inserted, at any position. It
    is at least the composition of Gaussian(z) over the same steps (what the
    steps would cost with sensitivity C and no sampling). A client with fewer
    than m examples takes no step (an empty composition, epsilon 0).
    """
    _check_dp_sgd_args(num_examples, batch_size, noise_multiplier, epochs)
    if not (isinstance(epochs, (int, np.integer)) and epochs >= 1):
        raise ConfigError("epochs", "an integer >= 1 with shuffled batches", epochs)
    if not (isinstance(microbatch_size, (int, np.integer)) and microbatch_size >= 1):
        raise ConfigError("microbatch_size", "an integer >= 1", microbatch_size)
    counts = Counter(shuffle_sensitivities(num_examples, batch_size, microbatch_size))
    events = [dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(noise_multiplier / s), int(epochs) * c)
        for s, c in sorted(counts.items())]
    if len(events) == 1:
        return events[0]
    return dp_accounting.ComposedDpEvent(events)


def round_event(num_examples: int, batch_size: int, noise_multiplier: float,
                local_epochs: float, *, batch_sampling: str = "poisson",
                microbatch_size: int = 1) -> DpEvent:
    """The DpEvent of one client's round of :class:`DPSGDTrainer`:
    :func:`poisson_round_event` or :func:`shuffle_round_event`.
    ``microbatch_size``: examples per microbatch (1 unless
    ``client.num_microbatches`` is set; Poisson batches need 1)."""
    if batch_sampling == "poisson":
        if microbatch_size != 1:
            raise ConfigError("microbatch_size", "1 with batch_sampling=poisson",
                              microbatch_size)
        return poisson_round_event(num_examples, batch_size, noise_multiplier, local_epochs)
    if batch_sampling == "shuffle":
        return shuffle_round_event(num_examples, batch_size, noise_multiplier, local_epochs,
                                   microbatch_size)
    raise ConfigError("batch_sampling", "one of " + ", ".join(BATCH_SAMPLING), batch_sampling)


def round_steps(num_examples: int, batch_size: int, local_epochs: float, *,
                batch_sampling: str = "poisson", microbatch_size: int = 1) -> int:
    """DP-SGD steps that :class:`DPSGDTrainer` runs, and :func:`round_event`
    charges, in one round on ``num_examples`` examples (0 for none)."""
    if num_examples < 1:
        return 0
    if batch_sampling == "poisson":
        return poisson_steps(num_examples, batch_size, local_epochs)
    if batch_sampling == "shuffle":
        return len(shuffle_schedule(num_examples, batch_size, microbatch_size)) * int(
            local_epochs)
    raise ConfigError("batch_sampling", "one of " + ", ".join(BATCH_SAMPLING), batch_sampling)


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
    """TF Privacy's example-level epsilon at ``delta`` of DP-SGD (:func:`dp_sgd_event`).

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
                           accountant: str = "rdp", *, used_microbatching: bool = False,
                           batch_sampling: str = "poisson",
                           microbatch_size: int = 1) -> float:
    """Example-level epsilon of one client's DP-SGD over all its rounds.

    The client took part in ``participations`` rounds; in each it ran
    :class:`DPSGDTrainer` for ``local_epochs`` epochs on its ``num_examples``
    examples, whose steps :func:`round_event` charges exactly (Poisson batches:
    amplified by sampling; shuffled batches: no amplification, see
    :func:`shuffle_round_event`). The rounds compose ``participations`` times
    (adaptively: each round starts from a model that depends on earlier
    releases). This bounds what the client's released model updates reveal
    about any one of its examples, whatever the server does with them; it is
    not a user-level guarantee, and it does not cover what the client reports
    beside its update (its number of examples and its mean training loss are
    sent as they are).

    ``used_microbatching`` (Poisson only, TF Privacy's formula): microbatches
    hold more than one example, the sensitivity doubles. ``microbatch_size``
    (shuffle): examples per microbatch. Returns 0 for 0 participations (or no
    step), ``inf`` without noise.
    """
    if not (isinstance(participations, (int, np.integer)) and participations >= 0):
        raise ConfigError("participations", "an integer >= 0", participations)
    if batch_sampling == "shuffle" and used_microbatching:
        raise ConfigError("used_microbatching", "False with batch_sampling=shuffle (give "
                          "microbatch_size instead)", used_microbatching)
    if batch_sampling == "poisson" and used_microbatching:
        round_ = poisson_round_event(num_examples, batch_size, noise_multiplier,
                                     local_epochs, used_microbatching=True)
    else:
        round_ = round_event(num_examples, batch_size, noise_multiplier, local_epochs,
                             batch_sampling=batch_sampling, microbatch_size=microbatch_size)
    if not 0 < delta < 1:
        raise ConfigError("delta", "a number in (0, 1)", delta)
    steps = round_steps(num_examples, batch_size, local_epochs,
                        batch_sampling=batch_sampling, microbatch_size=microbatch_size)
    if participations == 0 or steps == 0:
        return 0.0
    event = dp_accounting.SelfComposedDpEvent(round_, int(participations))
    return _epsilon(event, noise_multiplier, delta, accountant)


# --------------------------------------------------------------------------- noise and batches

SAMPLING_STREAM = 0
"""``spawn_key[0]`` of the streams that draw Poisson batches."""
NOISE_STREAM = 1
"""``spawn_key[0]`` of the streams that draw DP-SGD noise."""


def step_stream(key: Sequence[int], purpose: int, step: int, variable: int = 0
                ) -> np.random.Generator:
    """The numpy Generator of one draw of one DP-SGD step.

    ``np.random.SeedSequence(entropy=[key[0], key[1]], spawn_key=(purpose,
    step, variable))``: key is the client's noise key (two 63-bit integers
    from its rng), purpose :data:`SAMPLING_STREAM` (the step's Poisson batch,
    variable 0) or :data:`NOISE_STREAM` (the noise of trainable variable
    number ``variable``). The spawn key has a fixed length, so distinct
    (purpose, step, variable) never share a stream.
    """
    return np.random.default_rng(np.random.SeedSequence(
        entropy=[int(k) for k in key], spawn_key=(int(purpose), int(step), int(variable))))


def step_noise(key: Sequence[int], step: int, shapes: Sequence[Sequence[int]], std: float
               ) -> list[np.ndarray]:
    """The float64 noise of DP-SGD step ``step``: for variable i,
    ``fedsim.privacy.noise.gaussian(step_stream(key, NOISE_STREAM, step, i), shapes[i], std)``."""
    return [noise.gaussian(step_stream(key, NOISE_STREAM, step, i), tuple(shape), std)
            for i, shape in enumerate(shapes)]


def poisson_batch(key: Sequence[int], step: int, num_examples: int, q: float) -> np.ndarray:
    """The indices (int32, ascending) of step ``step``'s Poisson batch: those
    i whose uniform ``step_stream(key, SAMPLING_STREAM, step).random(n)[i]``
    is below q (each independently with :func:`inclusion_probability`). May be
    empty."""
    u = step_stream(key, SAMPLING_STREAM, step).random(int(num_examples))
    return np.flatnonzero(u < q).astype(np.int32)


def _graph_noise(key: tf.Tensor, step: tf.Tensor, shapes: Sequence[tf.TensorShape],
                 std: float) -> list[tf.Tensor]:
    """:func:`step_noise` inside a graph (``tf.numpy_function``): float64 tensors."""
    shapes = [tuple(int(d) for d in s) for s in shapes]
    out = tf.numpy_function(lambda k, s: step_noise(k, s, shapes, std), [key, step],
                            [tf.float64] * len(shapes), name="dp_sgd_noise")
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    for t, shape in zip(out, shapes):
        t.set_shape(shape)
    return out


# --------------------------------------------------------------------------- training


class SeededGaussianSumQuery(gaussian_query.GaussianSumQuery):
    """TF Privacy's ``GaussianSumQuery`` whose noise is :func:`step_noise`.

    Clipping, summing and the reported DpEvent are the parent's; only
    ``get_noised_result`` differs: leaf ``i`` of the summed record (variable
    i) becomes ``float32(float64(sum_i) + step_noise(key, step, ...)[i])``,
    numpy's float64 Gaussian of std ``stddev`` with exact tails, where (key,
    step) is set with :meth:`seeded` around each optimizer step. The parent
    draws float32 noise from TF's stateful global RNG instead (Box-Muller,
    never beyond 5.678 standard deviations), which neither has the Gaussian's
    tails nor can be replayed. Asking for noise outside :meth:`seeded` raises,
    so no step can silently fall back to an unseeded stream.
    """

    def __init__(self, l2_norm_clip: float, stddev: float) -> None:
        super().__init__(l2_norm_clip, stddev)
        self._noise_std = float(stddev)
        self._seed: Optional[tuple[tf.Tensor, tf.Tensor]] = None

    def seeded(self, key: tf.Tensor, step: tf.Tensor) -> "_SeedScope":
        """Context in which ``get_noised_result`` draws step ``step``'s noise of
        noise key ``key`` (int64 ``[2]``)."""
        return _SeedScope(self, (key, step))

    def get_noised_result(self, sample_state, global_state):
        if self._seed is None:
            raise RuntimeError("SeededGaussianSumQuery: noise requested without a step seed "
                               "(wrap the optimizer step in query.seeded(key, step))")
        key, step = self._seed
        leaves = tf.nest.flatten(sample_state)
        draws = _graph_noise(key, step, [v.shape for v in leaves], self._noise_std)
        noised = [tf.cast(tf.cast(v, tf.float64) + d, v.dtype) for v, d in zip(leaves, draws)]
        result = tf.nest.pack_sequence_as(sample_state, noised)
        noise_multiplier = global_state.stddev / global_state.l2_norm_clip
        return result, global_state, dp_accounting.GaussianDpEvent(noise_multiplier)


class _SeedScope:
    def __init__(self, query: SeededGaussianSumQuery,
                 seed: tuple[tf.Tensor, tf.Tensor]) -> None:
        self.query, self.seed = query, seed

    def __enter__(self) -> None:
        self.query._seed = self.seed

    def __exit__(self, *exc: object) -> None:
        self.query._seed = None


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
    """Trains clients with DP-SGD, batches Poisson-sampled or shuffled.

    Same interface as :class:`fedsim.client.local.LocalTrainer`: ``train(global_weights,
    x, y, rng)`` returns ``delta = global - local``, the client's number of
    examples and its mean training loss. With C = ``client_cfg.l2_norm_clip``,
    z = ``client_cfg.noise_multiplier``, lr = ``client_cfg.learning_rate`` and
    momentum ``client_cfg.momentum`` (Keras SGD, momentum reset for every
    client, as LocalTrainer), each step on a client of n examples is::

        g_j  = gradient of the mean loss of microbatch j, clipped to L2 norm C
        grad = float32((float64(sum_j g_j) + N(0, (z C)^2 I)) / denominator)
        w   <- w - lr * grad                                (with momentum: as Keras SGD)

    The noise is numpy's float64 Gaussian (:func:`step_noise`, exact tails)
    added to the float64 sum. ``client_cfg.batch_sampling`` decides the rest:

    * ``poisson`` (default): ``poisson_steps(n, batch_size, local_epochs)`` =
      ceil(local_epochs / q) steps, q = min(batch_size / n, 1); each step's
      batch holds every example independently with probability q
      (:func:`poisson_batch`), so its size varies and may be 0 (the step still
      happens and releases noise only). One example per microbatch (no
      ``num_microbatches``), denominator the expected batch size q n =
      min(batch_size, n), as Opacus and Abadi et al. The step is computed
      here: per-example gradients, each scaled by C / max(norm, C) (what TF
      Privacy's ``tf.clip_by_global_norm`` does), summed, noised, divided,
      then ``tf.keras.optimizers.legacy.SGD`` (the base of TF Privacy's
      optimizer) applies it.
    * ``shuffle``: the examples are shuffled each epoch (``epoch_order(n,
      local_epochs, rng)``, as LocalTrainer, so both see the same batches) and
      cut into fixed batches of ``batch_size`` (:func:`shuffle_schedule`),
      split into k microbatches of m = batch_size / ``num_microbatches``
      consecutive examples (None: m = 1); the denominator is the step's number
      of microbatches. Every microbatch holds exactly m examples: the short
      last batch of an epoch is cut down to a multiple of m, so at most m - 1
      examples per epoch are skipped (different ones each epoch). The step is
      TF Privacy's ``GenericDPSGDOptimizer`` with a Gaussian sum query of clip
      C and std z C, i.e. what ``DPKerasSGDOptimizer(C, z, ...)`` builds,
      except for the noise (:class:`SeededGaussianSumQuery`). The optimizer
      gets one loss per microbatch (the mean over its examples, as TF
      Privacy's reshape to ``[k, -1]`` forms it) and ``num_microbatches=None``.

    Speed: per-microbatch gradients come from ``tf.vectorized_map`` over the
    microbatches, O(b) work per step; a real tape's jacobian (what TF Privacy
    asks for) vectorizes the whole batch's backward pass once per microbatch,
    O(k b). In shuffle mode they reach the optimizer through
    :class:`MicrobatchJacobianTape`; clipping, averaging and the update stay TF
    Privacy's (tested equal to the stock ``DPKerasSGDOptimizer``). This is
    exact for models without cross-example layers (no batch normalization), as
    all fedsim's built-in models are (a user's model must be too).

    Randomness: shuffle draws the epoch permutations from ``rng`` first; then
    (both modes) a noise key, two 63-bit integers. Step s's batch (Poisson) and
    noise depend only on (key, s, variable) (:func:`step_stream`), so the same
    rng state and inputs give bit-identical deltas, whichever client was
    trained before. All steps run in one ``tf.function`` call, traced once
    (input signature with None dims).

    After each ``train``, ``last_steps`` is the number of steps the compiled
    loop ran and ``last_batch_sizes`` the examples each step used.

    Privacy: :func:`client_example_epsilon` with ``batch_sampling=
    self.batch_sampling, microbatch_size=self.microbatch_size`` charges
    exactly these steps (:func:`round_event`).
    """

    def __init__(self, model: ModelSpec, client_cfg: ClientConfig,
                 input_shape: Sequence[int], num_classes: int, batch_size: int,
                 local_epochs: int, seed: int = 0) -> None:
        """model: what to train; each microbatch's gradient is that of the mean
        of ``model.loss`` (per example) over its examples."""
        self.spec = model
        self.model = model.build(input_shape, num_classes, seed)
        self.flat = FlatWeights(self.model.trainable_variables)
        self.batch_size = int(batch_size)
        self.local_epochs = int(local_epochs)
        self.batch_sampling = client_cfg.batch_sampling
        if self.batch_sampling not in BATCH_SAMPLING:
            raise ConfigError("client.batch_sampling", "one of " + ", ".join(BATCH_SAMPLING),
                              self.batch_sampling)
        if self.batch_sampling == "poisson" and client_cfg.num_microbatches is not None:
            raise ConfigError("client.num_microbatches", "null with client.batch_sampling="
                              "poisson (a Poisson batch has no fixed microbatch split), or set "
                              "client.batch_sampling=shuffle", client_cfg.num_microbatches)
        self.l2_norm_clip = float(client_cfg.l2_norm_clip)
        self.noise_multiplier = float(client_cfg.noise_multiplier)
        self.noise_std = self.l2_norm_clip * self.noise_multiplier
        self.microbatch_size = microbatch_size(self.batch_size, client_cfg.num_microbatches)
        self._momentum = float(client_cfg.momentum)
        if self.batch_sampling == "shuffle":
            self._query = SeededGaussianSumQuery(self.l2_norm_clip, self.noise_std)
            self._opt = tensorflow_privacy.GenericDPSGDOptimizer(
                dp_sum_query=self._query, num_microbatches=None,
                learning_rate=client_cfg.learning_rate, momentum=self._momentum)
        else:
            self._opt = tf.keras.optimizers.legacy.SGD(
                learning_rate=client_cfg.learning_rate, momentum=self._momentum)
        # Create the optimizer's variables now (not inside the first trace), so
        # the momentum slots can be reset at the start of every client.
        self._opt._create_all_weights(self.model.trainable_variables)
        # Per-microbatch gradients: vectorized (tf.vectorized_map), or for models with
        # recurrent layers, whose loop gradients pfor cannot convert, a graph loop.
        self._loop_microbatches = any(isinstance(layer, tf.keras.layers.RNN)
                                      for layer in self.model.submodules)
        self.last_steps: Optional[int] = None
        self.last_batch_sizes: Optional[np.ndarray] = None
        x_spec, y_spec = model.tensor_specs(input_shape)  # the data's layout
        common = [tf.TensorSpec([None], tf.float32), x_spec, y_spec]
        key_spec = tf.TensorSpec([2], tf.int64)
        if self.batch_sampling == "shuffle":
            self._train = SignatureGraph(
                self._train_shuffle, [*common, tf.TensorSpec([None], tf.int32), key_spec],
                autograph=False)
        else:
            self._train = SignatureGraph(
                self._train_poisson, [*common, key_spec, tf.TensorSpec([], tf.float64),
                                      tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float64)],
                autograph=False)

    @property
    def num_parameters(self) -> int:
        return self.flat.size

    @property
    def used_microbatching(self) -> bool:
        """Whether microbatches hold more than one example (TF Privacy's
        ``used_microbatching``: the add/remove sensitivity doubles)."""
        return self.microbatch_size > 1

    def steps_per_epoch(self, num_examples: int) -> int:
        """Shuffled batches: DP-SGD steps per epoch on ``num_examples`` examples
        (full batches, plus the short last batch if it holds at least one
        microbatch; :func:`shuffle_schedule`)."""
        return len(shuffle_schedule(num_examples, self.batch_size, self.microbatch_size))

    def steps(self, num_examples: int) -> int:
        """DP-SGD steps of one ``train`` call on ``num_examples`` examples in
        this trainer's batch sampling (:func:`round_steps`)."""
        return round_steps(num_examples, self.batch_size, self.local_epochs,
                           batch_sampling=self.batch_sampling,
                           microbatch_size=self.microbatch_size)

    def _microbatch_grads(self, xb: tf.Tensor, yb: tf.Tensor
                          ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Per-microbatch (loss sums ``[k]``, gradients of the mean losses
        ``[k, *var.shape]`` per variable) for a batch of k * m examples
        (k may be 0: empty tensors)."""
        m = self.microbatch_size
        variables = self.model.trainable_variables
        xm = tf.reshape(xb, tf.concat([[-1, m], tf.shape(xb)[1:]], axis=0))
        ym = tf.reshape(yb, tf.concat([[-1, m], tf.shape(yb)[1:]], axis=0))

        def one(args: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
            x1, y1 = args
            with tf.GradientTape() as tape:
                out = self.spec.loss(y1, self.model(x1, training=True))
                if isinstance(out, (tuple, list)):  # (numerator, denominator) per example
                    mean = tf.reduce_sum(out[0]) / tf.maximum(tf.reduce_sum(out[1]), 1e-12)
                    total = mean * tf.cast(tf.shape(x1)[0], tf.float32)
                else:
                    mean = tf.reduce_mean(out)
                    total = tf.reduce_sum(out)
                if self.model.losses:  # regularizers: data-independent, no sensitivity
                    mean += tf.add_n(self.model.losses)
            grads = tape.gradient(mean, variables,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return total, grads

        if not self._loop_microbatches:
            return tf.vectorized_map(one, (xm, ym))
        # Recurrent layers: their while loop's gradient cannot be vectorized (pfor);
        # the microbatches then run one after another in a graph loop (same values).
        return tf.map_fn(one, (xm, ym), fn_output_signature=(
            tf.TensorSpec([], tf.float32),
            [tf.TensorSpec(v.shape, v.dtype) for v in variables]))

    def _reset(self, global_flat: tf.Tensor) -> None:
        self.flat.assign(global_flat)
        if self._momentum > 0:
            for v in self.model.trainable_variables:
                slot = self._opt.get_slot(v, "momentum")
                slot.assign(tf.zeros_like(slot))

    def _loop(self, total_steps: tf.Tensor, step_fn: Callable[[tf.Tensor], tuple]
              ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Runs ``step_fn(step) -> (loss sum, examples)`` for steps 0 ..
        total_steps - 1; returns (steps run, loss sum, examples per step)."""
        sizes = tf.TensorArray(tf.int32, size=total_steps, element_shape=[])

        def body(step, total_loss, sizes):
            loss_sum, size = step_fn(step)
            return step + 1, total_loss + loss_sum, sizes.write(step, size)

        steps, total_loss, sizes = tf.while_loop(
            lambda step, *_: step < total_steps, body,
            [tf.constant(0), tf.constant(0.0), sizes])
        return steps, total_loss, sizes.stack()

    # -- shuffled fixed-size batches: TF Privacy's optimizer

    def _shuffle_step(self, step: tf.Tensor, x: tf.Tensor, y: tf.Tensor, order: tf.Tensor,
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
        with self._query.seeded(key, step):
            # the per-microbatch mean losses, one "example" each for the optimizer
            self._opt.minimize(loss_sums / m, self.model.trainable_variables, tape=tape)
        return tf.reduce_sum(loss_sums), size

    def _train_shuffle(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                       order: tf.Tensor, key: tf.Tensor) -> tuple[tf.Tensor, ...]:
        self._reset(global_flat)
        n = tf.shape(x)[0]
        bs = tf.constant(self.batch_size, tf.int32)
        steps_per_epoch = n // bs + tf.cast(n % bs >= self.microbatch_size, tf.int32)
        steps, total_loss, sizes = self._loop(
            steps_per_epoch * self.local_epochs,
            lambda step: self._shuffle_step(step, x, y, order, key, n, steps_per_epoch))
        return global_flat - self.flat.get(), total_loss, sizes, steps

    # -- Poisson batches: the step written out

    def _poisson_step(self, step: tf.Tensor, x: tf.Tensor, y: tf.Tensor, key: tf.Tensor,
                      q: tf.Tensor, denominator: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One Poisson DP-SGD step; returns (sum of per-example losses, batch size)."""
        idx = tf.numpy_function(poisson_batch, [key, step, tf.shape(x)[0], q], tf.int32,
                                name="poisson_batch")
        idx.set_shape([None])
        losses, grads = self._microbatch_grads(tf.gather(x, idx), tf.gather(y, idx))
        norms = tf.sqrt(tf.add_n([
            tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1)
            for g in grads]))
        clip = tf.constant(self.l2_norm_clip, tf.float32)
        scale = clip / tf.maximum(norms, clip)  # tf.clip_by_global_norm's factor
        variables = self.model.trainable_variables
        draws = _graph_noise(key, step, [v.shape for v in variables], self.noise_std)
        final = [tf.cast((tf.cast(tf.tensordot(scale, g, axes=1), tf.float64) + d)
                         / denominator, tf.float32) for g, d in zip(grads, draws)]
        self._opt.apply_gradients(zip(final, variables))
        return tf.reduce_sum(losses), tf.size(idx)

    def _train_poisson(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                       key: tf.Tensor, q: tf.Tensor, total_steps: tf.Tensor,
                       denominator: tf.Tensor) -> tuple[tf.Tensor, ...]:
        self._reset(global_flat)
        steps, total_loss, sizes = self._loop(
            total_steps, lambda step: self._poisson_step(step, x, y, key, q, denominator))
        return global_flat - self.flat.get(), total_loss, sizes, steps

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray,
              rng: np.random.Generator,
              noise_rng: Optional[np.random.Generator] = None) -> ClientResult:
        """Train one client from ``global_weights`` with DP-SGD.

        ``rng`` gives the shuffles (shuffle mode), then the noise key, which
        ``noise_rng`` gives instead when set (the simulation passes the
        client's stream under ``dp.noise_seed``: the noise and the Poisson
        batches, whose secrecy the amplification assumes). loss:
        mean per-example training loss over the examples the steps used (NaN
        if they used none: a shuffle client with fewer examples than one
        microbatch takes no step, and its delta is zero).
        """
        n = len(x)
        key_high = np.iinfo(np.int64).max
        if self.batch_sampling == "shuffle":
            order = epoch_order(n, self.local_epochs, rng)
            key = (noise_rng or rng).integers(0, key_high, size=2, dtype=np.int64)
            delta, loss_sum, sizes, steps = self._train(global_weights, x, y, order, key)
        else:
            key = (noise_rng or rng).integers(0, key_high, size=2, dtype=np.int64)
            q = sampling_probability(n, self.batch_size) if n else 1.0
            delta, loss_sum, sizes, steps = self._train(
                global_weights, x, y, key, q, self.steps(n),
                float(max(min(self.batch_size, n), 1)))
        self.last_steps = int(steps)
        self.last_batch_sizes = batch_sizes = sizes.numpy()
        seen = int(batch_sizes.sum())
        loss = float(loss_sum) / seen if seen else math.nan
        return ClientResult(delta=delta.numpy(), num_examples=int(n), loss=loss)


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
    by :func:`fedsim.data.loaders.load_federated_data` as one IID client."""
    from fedsim.config import DataConfig
    from fedsim.data.loaders import load_federated_data

    cfg = (DataConfig(name="digits", partition="iid") if mnist_path is None
           else DataConfig(name="mnist", path=mnist_path, partition="iid"))
    data = load_federated_data(cfg, clients=1, seed=seed)
    x, y = data.train.client(0)
    return CentralData(x, y, data.x_test, data.y_test, data.num_classes, data.name)


@dataclass(frozen=True)
class CentralResult:
    """Outcome of :func:`train_central`.

    accuracy: test accuracy after the last epoch. epsilon: example-level
    epsilon at ``delta`` of the steps taken (:func:`client_example_epsilon`
    on the training-set size, one "participation" per epoch). history: test
    accuracy after each epoch. steps: DP-SGD steps taken (counted by the
    trainer). batch_sampling and assumption: how batches were drawn and which
    analysis the epsilon is (:data:`ASSUMPTIONS`).
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
    batch_sampling: str = "poisson"
    assumption: str = ASSUMPTIONS["poisson"]


def evaluate(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model``'s logits on ``(x, y)``."""
    correct = 0
    for s in range(0, len(x), batch_size):
        logits = model(x[s:s + batch_size], training=False)
        correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == y[s:s + batch_size]))
    return correct / max(len(x), 1)


def train_central(data: CentralData, client_cfg: ClientConfig, batch_size: int, epochs: int,
                  *, model: Optional[ModelSpec | Callable[..., tf.keras.Model]] = None,
                  model_cfg: Optional[ModelConfig] = None, accountant: str = "rdp",
                  seed: int = 0,
                  on_epoch: Optional[Callable[[int, float], None]] = None) -> CentralResult:
    """DP-SGD on a whole training set, as TF Privacy's tutorial does it.

    Trains ``model`` (a ModelSpec or a builder, e.g. :func:`tutorial_cnn`; built
    with ``seed``) or else ``model_cfg``'s fedsim model (default mlp) with
    :class:`DPSGDTrainer` (batches as ``client_cfg.batch_sampling``) for
    ``epochs`` epochs, one compiled call of one epoch each (Poisson:
    ceil(1 / q) steps per call; shuffle: one pass, reshuffled), with the
    randomness from ``seed``; evaluates on the test split after each epoch
    (``on_epoch(epoch, accuracy)``), and accounts for exactly the steps run
    at ``client_cfg.delta``: :func:`client_example_epsilon` with one epoch
    per participation. With Poisson batches and MNIST's 60,000 examples at
    batch 250 that is TF Privacy's count (720 steps for 3 epochs) and
    :func:`dp_sgd_epsilon`'s figure; in general ``epochs * ceil(1 / q)`` can
    exceed TF Privacy's ``ceil(epochs / q)`` by up to epochs - 1 steps.
    """
    if epochs < 1:
        raise ConfigError("epochs", "an integer >= 1", epochs)
    input_shape = data.x_train.shape[1:]
    spec = as_spec(model) if model is not None else model_spec(model_cfg or ModelConfig())
    trainer = DPSGDTrainer(spec, client_cfg, input_shape, data.num_classes, batch_size,
                           local_epochs=1, seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x647073,)))
    weights = trainer.flat.get().numpy()
    history: list[float] = []
    steps = 0
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        result = trainer.train(weights, data.x_train, data.y_train, rng)
        steps += int(trainer.last_steps or 0)
        weights = weights - result.delta
        trainer.flat.assign(tf.constant(weights))
        history.append(evaluate(trainer.model, data.x_test, data.y_test))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    seconds = time.perf_counter() - t0
    n = len(data.x_train)
    epsilon = client_example_epsilon(n, batch_size, client_cfg.noise_multiplier, 1, epochs,
                                     client_cfg.delta, accountant,
                                     batch_sampling=trainer.batch_sampling,
                                     microbatch_size=trainer.microbatch_size)
    return CentralResult(accuracy=history[-1], epsilon=epsilon, delta=client_cfg.delta,
                         accountant=accountant, num_train=n, num_test=len(data.x_test),
                         epochs=epochs, steps=steps, seconds=seconds, history=history,
                         batch_sampling=trainer.batch_sampling,
                         assumption=ASSUMPTIONS[trainer.batch_sampling])

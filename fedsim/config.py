"""Typed experiment configuration.

Every option of a simulation is a field of one of the dataclasses below. They
serve twice: Hydra uses them as structured-config schemas (so a YAML file or a
command-line override with a wrong type or an unknown key is refused before
anything runs), and Python users build them directly::

    from fedsim.config import SimConfig, ModelConfig
    cfg = SimConfig(clients=50, clients_per_round=5, model=ModelConfig(name="logreg"))

Constructing a config validates it (``__post_init__``): a bad value raises
:class:`fedsim.errors.ConfigError`, whose message names the option and what is
allowed.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from fedsim.errors import ConfigError

AUTO_VECTORIZE = 64
"""Clients per compiled call that ``client.vectorize=auto`` picks."""

DATASETS = ("digits", "synthetic", "mnist", "emnist", "tff_client_data", "leaf")
TFF_DATASET_NAMES = ("emnist", "emnist_only_digits", "cifar100", "shakespeare", "stackoverflow")
LEAF_DATASETS = ("femnist", "shakespeare", "sent140")
STACKOVERFLOW_TASKS = ("nwp", "tp")
CIFAR100_LABELS = ("label", "coarse_label")
MODELS = ("logreg", "mlp", "cnn", "keras")
# module.path:attr.path, as ``model.builder`` (and ``aggregator.factory``) name a callable
CALLABLE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
DP_MECHANISMS = ("none", "gaussian", "gaussian_adaptive", "laplace", "distributed_skellam",
                 "tree_aggregation", "tree_adaptive", "banded_mf", "blt")
ACCOUNTANTS = ("rdp", "pld")
ALGORITHMS = ("fedavg", "fedprox", "scaffold", "mime_lite")
NOISE_SAMPLERS = ("float64", "discrete_gaussian")
SECAGG_PROTOCOLS = ("none", "secagg", "secagg_plus")
SAMPLING = ("uniform", "poisson", "epochs", "min_sep")  # (fedsim.cohort.sampling.SCHEMES)
WEIGHTINGS = ("num_examples", "uniform")
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")
CLIENT_OPTIMIZERS = ("sgd", "dp_sgd")
BATCH_SAMPLING = ("poisson", "shuffle")
# robust aggregators (fedsim.aggregation.robust): not sums, so no secure aggregation or central DP
ROBUST_AGGREGATORS = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan")
AGGREGATORS = ("native", "tff") + ROBUST_AGGREGATORS
AUDITS = ("none", "canary")
TRACKERS = ("none", "mlflow")


def _check(ok: bool, option: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(option, allowed, value)


def _positive(option: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
           option, "a finite number > 0", value)


def _one_of(option: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, option, "one of " + ", ".join(allowed), value)


@dataclass
class DataConfig:
    """Which data, and how it is split over the virtual clients.

    name: ``digits`` (scikit-learn's bundled 8x8 handwritten digits, no download),
      ``synthetic`` (LEAF's synthetic(alpha, beta), generated per client on demand),
      ``mnist`` (Keras ``mnist.npz`` at ``path``), ``emnist`` (TFF's federated EMNIST
      h5 files in the directory ``path``), ``tff_client_data`` (a TFF ``ClientData``:
      a ``SqlClientData`` sqlite file, or a TFF dataset from TFF's cache; see
      :mod:`fedsim.data.tff`), ``leaf`` (LEAF's JSON files of ``leaf_dataset``;
      :mod:`fedsim.data.leaf`).
    path: local file or directory for ``mnist``/``emnist``; never downloaded. For
      ``tff_client_data``: the ``SqlClientData`` sqlite file, or with
      ``tff_dataset`` TFF's cache directory (null: ``~/.tff``) or the file itself
      (stackoverflow: the vocabulary files ``stackoverflow.word_count`` and
      ``stackoverflow.tag_count`` lie next to the sqlite file). For ``leaf``: the
      dataset's ``data`` directory (holding ``train/`` and ``test/``) or a
      directory above it (``<path>/data``, ``<path>/<leaf_dataset>/data``).
    partition: ``dirichlet`` (label skew, per-class proportions ~ Dir(alpha)) or
      ``iid`` (uniform random split). Ignored by natively federated data
      (``synthetic``, ``emnist``).
    alpha: Dirichlet concentration; smaller is more skewed. > 0.
    test_fraction: share of a centralized dataset (digits) held out as the global
      test split, in (0, 1).
    synthetic_alpha, synthetic_beta: LEAF's model and data heterogeneity.
    synthetic_dim, synthetic_classes: feature dimension and number of classes.
    synthetic_iid: ``synthetic`` only: FedProx's Synthetic-IID instead of LEAF's
      synthetic(alpha, beta): one labelling model W, b shared by all clients
      (drawn from the seed alone) and features x ~ N(0, diag(j^-1.2)) for every
      client, still generated per client; synthetic_alpha and synthetic_beta
      are ignored. A global model can learn it (``data=synthetic_iid``).
    test_clients: synthetic only: how many clients' held-out 20% form the global
      test split.
    tff_dataset: ``tff_client_data`` only: ``emnist`` (62 classes),
      ``emnist_only_digits``, ``cifar100``, ``shakespeare`` (character
      next-token prediction, :mod:`fedsim.data.shakespeare`) or ``stackoverflow``
      (:mod:`fedsim.data.stackoverflow`), read from the sqlite file that
      ``tff.simulation.datasets.<name>.load_data(cache_dir=path)`` caches
      (``emnist_all.sqlite``, ``cifar100.sqlite``, ``shakespeare.sqlite``,
      ``stackoverflow.sqlite``); null: ``path`` is a custom file.
    x_key, y_key: features of each element that are the input and the label
      (custom files; the TFF datasets set their own).
    x_shape: shape of one input (e.g. ``[28, 28, 1]``); null: as stored (tf.Example
      features are flat), or the element's shape for ClientData objects.
    train_split, test_split: custom files: the ``split_name`` of the training and
      test clients. null train_split: every split except test_split. null
      test_split: ``test_fraction`` of the client ids (at least one, chosen with
      the seed) are held out as the global test split.
    num_classes: custom files: labels lie in ``[0, num_classes)``; null: read
      from the labels of the selected clients and the test split (one pass).
    leaf_dataset: ``leaf`` only (required): ``femnist`` (62 classes),
      ``shakespeare`` (next character of 80) or ``sent140`` (binary sentiment).
    stackoverflow_task: ``tff_dataset=stackoverflow`` only: ``nwp`` (next-word
      prediction, TFF's ``word_prediction_preprocessing``) or ``tp`` (tag
      prediction, TFF's ``tag_prediction_preprocessing``). Default ``nwp``.
    vocab_size: words in the vocabulary (the most frequent ones): StackOverflow's
      word vocabulary (default 10000, TFF's ``DEFAULT_WORD_VOCAB_SIZE``) and
      sent140's (built from the training users' words). >= 1.
    tag_vocab_size: StackOverflow ``tp``: tags predicted (the most frequent;
      default 500, TFF's ``DEFAULT_TAG_VOCAB_SIZE``). >= 1.
    sequence_length: tokens per example; null: the dataset's default (TFF
      Shakespeare 80, StackOverflow ``nwp`` 20, LEAF sent140 25; LEAF
      Shakespeare's 80-character inputs are as stored). >= 1.
    cifar100_label: ``tff_dataset=cifar100`` only: ``label`` (100 fine classes,
      default) or ``coarse_label`` (20 superclasses).
    max_test_examples: StackOverflow only: at most this many examples in the
      global test split (the test rows of the selected clients, in client order;
      the first rows of the whole test split when they have none); default
      10000, null: no cap.
    """

    name: str = "digits"
    path: Optional[str] = None
    partition: str = "dirichlet"
    alpha: float = 0.5
    test_fraction: float = 0.2
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    synthetic_dim: int = 60
    synthetic_classes: int = 10
    synthetic_iid: bool = False
    test_clients: int = 100
    tff_dataset: Optional[str] = None
    x_key: str = "pixels"
    y_key: str = "label"
    x_shape: Optional[list[int]] = None
    train_split: Optional[str] = None
    test_split: Optional[str] = None
    num_classes: Optional[int] = None
    leaf_dataset: Optional[str] = None
    stackoverflow_task: str = "nwp"
    vocab_size: int = 10000
    tag_vocab_size: int = 500
    sequence_length: Optional[int] = None
    cifar100_label: str = "label"
    max_test_examples: Optional[int] = 10000

    def __post_init__(self) -> None:
        _one_of("data.name", self.name, DATASETS)
        _one_of("data.partition", self.partition, ("dirichlet", "iid"))
        _positive("data.alpha", self.alpha)
        _check(0 < self.test_fraction < 1, "data.test_fraction", "a number in (0, 1)",
               self.test_fraction)
        _check(self.synthetic_alpha >= 0, "data.synthetic_alpha", "a number >= 0",
               self.synthetic_alpha)
        _check(self.synthetic_beta >= 0, "data.synthetic_beta", "a number >= 0",
               self.synthetic_beta)
        _check(self.synthetic_dim >= 1, "data.synthetic_dim", "an integer >= 1",
               self.synthetic_dim)
        _check(self.synthetic_classes >= 2, "data.synthetic_classes", "an integer >= 2",
               self.synthetic_classes)
        _check(isinstance(self.synthetic_iid, bool), "data.synthetic_iid", "true or false",
               self.synthetic_iid)
        _check(not self.synthetic_iid or self.name == "synthetic", "data.synthetic_iid",
               "false unless data.name=synthetic", self.synthetic_iid)
        _check(self.test_clients >= 1, "data.test_clients", "an integer >= 1",
               self.test_clients)
        if self.name in ("mnist", "emnist", "leaf") and not self.path:
            raise ConfigError("data.path", f"a local path to the {self.name} data "
                              "(nothing is downloaded)", self.path)
        if self.name == "leaf" or self.leaf_dataset is not None:
            _check(self.leaf_dataset in LEAF_DATASETS, "data.leaf_dataset", "one of "
                   + ", ".join(LEAF_DATASETS) + " (with data.name=leaf)", self.leaf_dataset)
        _one_of("data.stackoverflow_task", self.stackoverflow_task, STACKOVERFLOW_TASKS)
        _one_of("data.cifar100_label", self.cifar100_label, CIFAR100_LABELS)
        _check(isinstance(self.vocab_size, int) and self.vocab_size >= 1, "data.vocab_size",
               "an integer >= 1", self.vocab_size)
        _check(isinstance(self.tag_vocab_size, int) and self.tag_vocab_size >= 1,
               "data.tag_vocab_size", "an integer >= 1", self.tag_vocab_size)
        if self.sequence_length is not None:
            _check(isinstance(self.sequence_length, int) and self.sequence_length >= 1,
                   "data.sequence_length", "an integer >= 1 (or null: the dataset's default)",
                   self.sequence_length)
        if self.max_test_examples is not None:
            _check(isinstance(self.max_test_examples, int) and self.max_test_examples >= 1,
                   "data.max_test_examples", "an integer >= 1 (or null: no cap)",
                   self.max_test_examples)
        if self.tff_dataset is not None:
            _check(self.tff_dataset in TFF_DATASET_NAMES, "data.tff_dataset", "one of "
                   + ", ".join(TFF_DATASET_NAMES) + ", or null for a custom SqlClientData "
                   "file in data.path", self.tff_dataset)
        elif self.name == "tff_client_data" and not self.path:
            raise ConfigError("data.path", "a TFF SqlClientData sqlite file, or set "
                              "data.tff_dataset (nothing is downloaded)", self.path)
        _check(bool(self.x_key), "data.x_key", "a non-empty feature name", self.x_key)
        _check(bool(self.y_key) and self.y_key != self.x_key, "data.y_key",
               f"a non-empty feature name other than data.x_key={self.x_key}", self.y_key)
        if self.x_shape is not None:
            _check(len(self.x_shape) >= 1 and all(int(n) >= 1 for n in self.x_shape),
                   "data.x_shape", "a non-empty list of integers >= 1 (or null)", self.x_shape)
        if self.num_classes is not None:
            _check(self.num_classes >= 2, "data.num_classes", "an integer >= 2 (or null)",
                   self.num_classes)


@dataclass
class ModelConfig:
    """The Keras model every client trains.

    name: ``logreg`` (softmax regression), ``mlp`` (hidden layers of ``hidden``
      units, ReLU), ``cnn`` (two 3x3 conv layers with ``filters`` channels, then a
      dense layer; needs image data), or ``keras``: your own model, built by
      ``builder``.
    builder: ``keras`` only: ``module:callable`` naming either a builder
      ``(input_shape, num_classes, seed) -> tf.keras.Model`` (logits out; trained
      with sparse categorical cross-entropy, evaluated with accuracy) or a
      :class:`fedsim.models.spec.ModelSpec` (its own loss and metrics), e.g.
      ``model=keras model.builder=examples.custom_model:build``. Only the format
      is checked here; the module is imported when the run starts
      (:func:`fedsim.models.spec.model_spec`). hidden and filters are ignored.
    loss: null (the task's default loss, or the ModelSpec's own), a Keras loss
      function's name (applied to logits, e.g. ``binary_crossentropy``) or
      ``module:callable`` naming a per-example loss ``(y_true, logits) -> [batch]``.
    metrics: null (the task's defaults, or the ModelSpec's own) or a list of
      names: the task's metrics (e.g. ``accuracy``, ``recall_at_5``,
      ``num_tokens``), Keras metric functions (e.g.
      ``sparse_top_k_categorical_accuracy``) or ``module:callable``; each is
      reported as ``eval_<name>`` (:mod:`fedsim.tasks.base`).
    """

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [200, 200])
    filters: list[int] = field(default_factory=lambda: [32, 64])
    builder: Optional[str] = None
    loss: Optional[str] = None
    metrics: Optional[list[str]] = None

    def __post_init__(self) -> None:
        _one_of("model.name", self.name, MODELS)
        if self.name == "keras":
            _check(isinstance(self.builder, str) and CALLABLE_PATH.fullmatch(self.builder)
                   is not None, "model.builder", "module:callable naming your model's "
                   "builder (e.g. my_pkg.models:build)", self.builder)
        else:
            _check(self.builder is None, "model.builder", f"null with model.name={self.name} "
                   "(your own builder needs model=keras)", self.builder)
        _check(all(int(h) >= 1 for h in self.hidden), "model.hidden",
               "a list of integers >= 1", self.hidden)
        _check(len(self.filters) >= 1 and all(int(f) >= 1 for f in self.filters),
               "model.filters", "a non-empty list of integers >= 1", self.filters)
        _check(self.loss is None or (isinstance(self.loss, str) and self.loss != ""),
               "model.loss", "null, a Keras loss name or module:callable", self.loss)
        if self.metrics is not None:
            self.metrics = list(self.metrics)
            _check(len(self.metrics) >= 1 and all(isinstance(m, str) and m for m in self.metrics)
                   and len(set(self.metrics)) == len(self.metrics), "model.metrics",
                   "null or a non-empty list of distinct metric names", self.metrics)


@dataclass
class ClientConfig:
    """Local training on each client.

    optimizer: ``sgd``, or ``dp_sgd`` (example-level DP inside every client: TF
      Privacy's DP Keras SGD optimizer, Abadi et al. 2016). learning_rate: step
      size of the client optimizer (the seed article uses 0.02; 0.05 reaches 90%
      on the bundled digits in 60 rounds).
    momentum: SGD momentum in [0, 1), reset for every client.
    l2_norm_clip: dp_sgd only: L2 clip of each microbatch's gradient.
    noise_multiplier: dp_sgd only: Gaussian noise std on the summed microbatch
      gradients = noise_multiplier * l2_norm_clip.
    num_microbatches: dp_sgd only: microbatches per batch; null: one per
      example (the batch size). Only null with batch_sampling ``poisson``.
    batch_sampling: dp_sgd only: how each step's batch is drawn. ``poisson``
      (default): every example joins independently with probability
      q = min(batch_size / n, 1) for ceil(local_epochs / q) steps per round, so
      the batch size varies; the example-level epsilon is TF Privacy's
      amplified-by-sampling figure, for the steps run. ``shuffle``: each epoch
      a permutation cut into fixed-size batches (microbatches allowed); the
      epsilon is a bound without amplification (:mod:`fedsim.client.dp_sgd`).
    delta: dp_sgd only: the delta at which each client's example-level epsilon
      is reported.
    vectorize: train this many clients at once in one compiled call
      (:mod:`fedsim.client.vectorized`), the same per-client mathematics as one
      at a time; 0 or 1: one client per call. sgd only. ``auto`` (default):
      vectorized, :data:`AUTO_VECTORIZE` clients per call, where it applies (plain
      SGD, an algorithm without a client side of its own, a built-in model
      classifying float32 inputs), else one at a time; never an error.
    """

    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.0
    l2_norm_clip: float = 1.0
    noise_multiplier: float = 1.1
    num_microbatches: Optional[int] = None
    batch_sampling: str = "poisson"
    delta: float = 1e-5
    vectorize: Any = "auto"  # "auto" or an integer (OmegaConf has no int|str union)

    def __post_init__(self) -> None:
        _one_of("client.optimizer", self.optimizer, CLIENT_OPTIMIZERS)
        if self.vectorize != "auto":
            try:
                ok = (isinstance(self.vectorize, (int, str))
                      and not isinstance(self.vectorize, bool) and int(self.vectorize) >= 0)
            except ValueError:
                ok = False
            _check(ok, "client.vectorize", "auto or an integer >= 0 (clients per compiled "
                   "call; 0 or 1: one at a time)", self.vectorize)
            self.vectorize = int(self.vectorize)
        if self.per_call > 1:
            _check(self.optimizer == "sgd", "client.vectorize",
                   "0 with client.optimizer=dp_sgd (vectorized training is plain SGD)",
                   self.vectorize)
        _positive("client.learning_rate", self.learning_rate)
        _check(0 <= self.momentum < 1, "client.momentum", "a number in [0, 1)", self.momentum)
        _positive("client.l2_norm_clip", self.l2_norm_clip)
        _check(self.noise_multiplier >= 0, "client.noise_multiplier", "a number >= 0",
               self.noise_multiplier)
        if self.num_microbatches is not None:
            _check(self.num_microbatches >= 1, "client.num_microbatches",
                   "an integer >= 1 (or null: one per example)", self.num_microbatches)
        _one_of("client.batch_sampling", self.batch_sampling, BATCH_SAMPLING)
        if self.optimizer == "dp_sgd" and self.batch_sampling == "poisson":
            _check(self.num_microbatches is None, "client.num_microbatches",
                   "null with client.batch_sampling=poisson (a Poisson batch has no fixed "
                   "microbatch split), or set client.batch_sampling=shuffle",
                   self.num_microbatches)
        _check(0 < self.delta < 1, "client.delta", "a number in (0, 1)", self.delta)


    @property
    def per_call(self) -> int:
        """Clients per compiled call as a number: ``vectorize``, 0 while it is
        ``auto`` (:func:`fedsim.simulation.resolve_vectorize` replaces ``auto``
        with a number before any actor starts)."""
        return 0 if self.vectorize == "auto" else int(self.vectorize)

@dataclass
class ServerConfig:
    """The server optimizer, applied to the aggregated update as a pseudo-gradient.

    The aggregate is the mean of client deltas ``global - local``, so ``sgd`` with
    learning_rate 1.0 and no momentum is plain FedAvg. ``adam``/``yogi``/``adagrad``
    give FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021) with TFF's formulas and
    defaults (``tff.learning.optimizers.build_adam``/``build_yogi``/``build_adagrad``).
    weighting: ``num_examples`` (FedAvg) or ``uniform`` (every client counts
    once; what DP aggregation uses).
    """

    optimizer: str = "sgd"
    learning_rate: float = 1.0
    momentum: float = 0.0
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: Optional[float] = None  # None: TFF's default, 1e-7 (adam, adagrad), 1e-3 (yogi)
    initial_preconditioner: Optional[float] = None  # yogi, adagrad; None: TFF's 1e-6, 0.1
    weighting: str = "num_examples"

    def __post_init__(self) -> None:
        _one_of("server.optimizer", self.optimizer, SERVER_OPTIMIZERS)
        _positive("server.learning_rate", self.learning_rate)
        _check(0 <= self.momentum < 1, "server.momentum", "a number in [0, 1)", self.momentum)
        _check(0 <= self.beta_1 < 1, "server.beta_1", "a number in [0, 1)", self.beta_1)
        _check(0 <= self.beta_2 < 1, "server.beta_2", "a number in [0, 1)", self.beta_2)
        if self.epsilon is not None:
            _positive("server.epsilon", self.epsilon)
        _check(self.initial_preconditioner is None or self.initial_preconditioner >= 0,
               "server.initial_preconditioner", "null or a number >= 0",
               self.initial_preconditioner)
        _one_of("server.weighting", self.weighting, WEIGHTINGS)


@dataclass
class DPConfig:
    """Central (user-level) differential privacy of the aggregate, TFF-style.

    Each client's update is clipped in the worker; the server adds noise once
    per round to the sum of the clipped updates and divides by
    ``clients_per_round`` (a fixed denominator, as TFF's
    ``DifferentiallyPrivateFactory``). DP aggregation weighs clients uniformly.

    mechanism:
      ``none``: plain mean, no privacy.
      ``gaussian``: TFF's ``gaussian_fixed``: L2 clip ``l2_norm_clip`` (C), noise std
        ``noise_multiplier * C`` on the sum (so ``noise_multiplier * C /
        clients_per_round`` on the average).
      ``gaussian_adaptive``: TFF's ``gaussian_adaptive``: the clip starts at
        ``initial_l2_norm_clip`` and moves geometrically (rate
        ``clip_learning_rate``) towards the ``target_unclipped_quantile`` of the
        update norms, estimated from a noised count (std ``clipped_count_stddev``,
        default 0.05 * clients_per_round). ``noise_multiplier`` is the total; the
        sum gets ``z_sum = (z^-2 - (2 * clipped_count_stddev)^-2)^-1/2``.
      ``laplace``: each update clipped to L1 norm ``sensitivity``; every coordinate of
        the sum gets Laplace noise of scale ``sensitivity / epsilon`` (``epsilon``
        per round, pure DP), then the sum is divided by clients_per_round.
      ``distributed_skellam``: distributed DP under secure aggregation: each client
        clips to L2 norm ``l2_norm_clip``, rounds to integers and adds its share of
        Skellam noise, so the unmasked sum carries noise of std ``noise_multiplier
        * l2_norm_clip`` (when all clients_per_round report) and the server never
        sees an un-noised sum (:mod:`fedsim.privacy.skellam`).
    zeroing_norm: updates whose L2 norm exceeds this, or that are not finite, are
      replaced by zeros before clipping (TFF's zeroing factory) and counted.
    accountant: ``rdp`` (dp-accounting's RdpAccountant) or ``pld``
      (PLDAccountant, Poisson sampling only).
    delta: target delta; null means ``clients ** -1.1`` (just below 1/clients).
    target_epsilon: if set, calibrate ``noise_multiplier`` (Gaussian) or the
      per-round ``epsilon`` (Laplace) before training so that all ``rounds``
      rounds spend exactly this epsilon.
    max_epsilon: if set, stop cleanly before a round that would exceed it.
    noise_sampler: ``float64`` (numpy's float64 Gaussian and Laplace, true tails,
      :mod:`fedsim.privacy.noise`) or ``discrete_gaussian`` (``gaussian`` under secure
      aggregation only: the server adds exact discrete Gaussian noise, Canonne,
      Kamath and Steinke 2020, to the unmasked INTEGER sum in fixed-point units,
      before it is scaled back: no floating-point caveat; accounted without
      sampling amplification, :mod:`fedsim.privacy.discrete_gaussian`).
    Correlated noise (DP-FTRL and matrix factorization; the noise of a round is
    correlated with earlier rounds' so that the model, a prefix sum of the
    releases, carries less of it; accounted over the whole run for the client
    that participates most, without sampling amplification: ``sampling=epochs``
    or ``sampling=min_sep``):
      ``tree_aggregation``: TFF's ``DifferentiallyPrivateFactory.tree_aggregation``
        (:mod:`fedsim.privacy.tree`): clip ``l2_norm_clip``, every tree node noised
        with std ``noise_multiplier * l2_norm_clip``.
      ``tree_adaptive``: TFF's ``tree_adaptive``: the adaptive clip's options as
        ``gaussian_adaptive`` (default ``clipped_count_stddev`` clients_per_round /
        20); the estimated clip is adopted at each restart.
      ``banded_mf``: banded matrix factorization (Choquette-Choo et al. 2023) with
        a banded Toeplitz strategy of ``bands`` bands (null: ``sampling.min_sep``
        or the rounds of an epoch, capped at ``rounds``); noise std on the sum
        ``noise_multiplier * l2_norm_clip * sensitivity`` of the strategy.
      ``blt``: a buffered linear Toeplitz mechanism (Dvijotham et al. 2024) with
        ``buffers`` buffers: the server keeps ``buffers`` vectors of the model's
        size, whatever the number of rounds.
    restart_every: tree mechanisms: ``epoch`` (restart the tree at the end of each
      epoch of ``sampling=epochs``), ``never``, or every k rounds (after the
      ``restart_warmup``-th round first, TF Privacy's ``PeriodicRoundRestartIndicator``).
    tree_efficient: TF Privacy's efficient tree (Honaker 2015; TFF's default) or the
      plain binary tree.
    strategy_cache: a directory where optimized matrix-factorization strategies are
      kept by their parameters (null: ``~/.cache/fedsim/strategies``).
    noise_seed: root of every privacy-noise stream (the server's noise, the
      clients' fixed-point rounding and Skellam shares, DP-SGD noise). ``run``:
      the run's ``seed``, so a simulation's noise is reproducible (two runs with
      the same seed reuse the same standard-normal draws, whatever their noise
      multipliers); ``os``: fresh entropy from the operating system at every
      start, recorded nowhere (for models that are released; a resumed run then
      draws new noise); or an integer >= 0 kept by the user.
    """

    mechanism: str = "none"
    noise_multiplier: float = 0.5
    l2_norm_clip: float = 2.0
    initial_l2_norm_clip: float = 0.1
    target_unclipped_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: Optional[float] = None
    sensitivity: float = 1.0
    epsilon: float = 1.0
    zeroing_norm: Optional[float] = 1000.0
    accountant: str = "rdp"
    delta: Optional[float] = None
    target_epsilon: Optional[float] = None
    max_epsilon: Optional[float] = None
    noise_sampler: str = "float64"
    noise_seed: Any = "run"  # "run", "os" or an integer (OmegaConf has no int|str union)
    restart_every: Any = "epoch"  # "epoch", "never" or an integer (tree mechanisms)
    restart_warmup: Optional[int] = None
    tree_efficient: bool = True
    bands: Optional[int] = None
    buffers: int = 4
    strategy_cache: Optional[str] = None

    def __post_init__(self) -> None:
        if ":" not in self.mechanism:  # module:callable: a user's mechanism (checked when built)
            _one_of("dp.mechanism", self.mechanism, DP_MECHANISMS)
        _one_of("dp.noise_sampler", self.noise_sampler, NOISE_SAMPLERS)
        if self.noise_seed not in ("run", "os"):
            try:
                ok = not isinstance(self.noise_seed, bool) and int(self.noise_seed) >= 0
            except (TypeError, ValueError):
                ok = False
            _check(ok, "dp.noise_seed", "run, os or an integer >= 0", self.noise_seed)
            self.noise_seed = int(self.noise_seed)
        _check(self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
               "dp.noise_multiplier", "a finite number >= 0", self.noise_multiplier)
        _positive("dp.l2_norm_clip", self.l2_norm_clip)
        _positive("dp.initial_l2_norm_clip", self.initial_l2_norm_clip)
        _check(0 <= self.target_unclipped_quantile <= 1, "dp.target_unclipped_quantile",
               "a number in [0, 1]", self.target_unclipped_quantile)
        _check(self.clip_learning_rate >= 0, "dp.clip_learning_rate", "a number >= 0",
               self.clip_learning_rate)
        if self.clipped_count_stddev is not None:
            _check(self.clipped_count_stddev >= 0, "dp.clipped_count_stddev",
                   "a number >= 0 (or null for 0.05 * clients_per_round)",
                   self.clipped_count_stddev)
        _positive("dp.sensitivity", self.sensitivity)
        _positive("dp.epsilon", self.epsilon)
        if self.zeroing_norm is not None:
            _positive("dp.zeroing_norm", self.zeroing_norm)
        _one_of("dp.accountant", self.accountant, ACCOUNTANTS)
        if self.delta is not None:
            _check(0 < self.delta < 1, "dp.delta", "a number in (0, 1) (or null for "
                   "clients ** -1.1)", self.delta)
        if self.target_epsilon is not None:
            _positive("dp.target_epsilon", self.target_epsilon)
        if self.max_epsilon is not None:
            _positive("dp.max_epsilon", self.max_epsilon)
        if self.restart_every not in ("epoch", "never"):
            try:
                ok = not isinstance(self.restart_every, bool) and int(self.restart_every) >= 1
            except (TypeError, ValueError):
                ok = False
            _check(ok, "dp.restart_every", "epoch, never or an integer >= 1",
                   self.restart_every)
            self.restart_every = int(self.restart_every)
        if self.restart_warmup is not None:
            _check(isinstance(self.restart_every, int)
                   and 1 <= self.restart_warmup < self.restart_every, "dp.restart_warmup",
                   "null, or an integer in [1, dp.restart_every) with an integer "
                   "dp.restart_every", self.restart_warmup)
        if self.bands is not None:
            _check(self.bands >= 1, "dp.bands", "an integer >= 1 (or null: "
                   "sampling.min_sep, or the rounds of an epoch)", self.bands)
        _check(1 <= self.buffers <= 16, "dp.buffers", "an integer in [1, 16]", self.buffers)


@dataclass
class SecAggConfig:
    """Secure aggregation of the client updates (the server sees only the sum).

    protocol: ``none``; ``secagg`` (Bonawitz et al. 2017: every pair of clients
      shares a mask); ``secagg_plus`` (Bell et al. 2020: a random Harary graph of
      degree ~2*log2(n)).
    clip: with ``dp=none``, every coordinate of an update is clipped to
      [-clip, clip] before fixed-point encoding (Flower's SecAgg+ default range is
      8.0). With DP, the DP clip bounds the coordinates instead.
    precision_bits: fixed-point resolution: the rounding step is clip / 2^precision_bits.
    bits: modulus exponent b of Z_(2^b); null picks the smallest b for which the
      sum of the cohort's vectors cannot wrap (at most 62).
    threshold: Shamir threshold t; null: floor(m/2) + 1 for neighbourhoods of m.
    neighbours: SecAgg+ graph degree k (even); null: 2 * ceil(log2(n)).
    dropout: probability that a sampled client drops out after sending its
      masked input (simulated; it does not answer the unmasking request).
    skip_cancelling_masks: each worker sends the server the sum of its clients'
      masked inputs, in which the pairwise masks of two of its own clients
      cancel. true: those masks are not computed, and SecAgg+ places ring
      neighbours on the same worker, so most of them cancel (the server's
      messages are bit for bit the same; the simulation spends less CPU than
      the clients would). false: every client computes all of its masks, as a
      deployed client does (to measure the protocol's full client-side cost).
    """

    protocol: str = "none"
    clip: float = 8.0
    precision_bits: int = 16
    bits: Optional[int] = None
    threshold: Optional[int] = None
    neighbours: Optional[int] = None
    dropout: float = 0.0
    skip_cancelling_masks: bool = True

    def __post_init__(self) -> None:
        _one_of("secagg.protocol", self.protocol, SECAGG_PROTOCOLS)
        _positive("secagg.clip", self.clip)
        _check(1 <= self.precision_bits <= 40, "secagg.precision_bits", "an integer in [1, 40]",
               self.precision_bits)
        if self.bits is not None:
            _check(2 <= self.bits <= 62, "secagg.bits", "an integer in [2, 62] (or null)",
                   self.bits)
        if self.threshold is not None:
            _check(self.threshold >= 2, "secagg.threshold", "an integer >= 2 (or null)",
                   self.threshold)
        if self.neighbours is not None:
            _check(self.neighbours >= 2 and self.neighbours % 2 == 0, "secagg.neighbours",
                   "an even integer >= 2 (or null)", self.neighbours)
        _check(0 <= self.dropout < 1, "secagg.dropout", "a probability in [0, 1)", self.dropout)


@dataclass
class RayConfig:
    """Where the simulation runs.

    address: None starts a local Ray instance; ``auto``, ``host:port`` (the head's
      GCS) or ``ray://host:port`` (Ray Client) joins an existing cluster.
    connect_timeout_s: how long to wait for that address to answer before
      giving up with an error naming it.
    num_cpus: CPUs of the local instance (None: all of the machine's).
    workers: size of the client worker pool: an integer >= 1, or ``auto`` (also
      0) for as many as the cluster's CPUs (and GPUs, if asked for) allow, e.g.
      ``floor(cpus / cpus_per_worker)``. The pool is spread over the cluster's
      nodes (a placement group with the SPREAD strategy).
    cpus_per_worker, gpus_per_worker: Ray resources of each worker actor; TF's
      thread pools are sized to the CPUs. Fractional GPUs share a card (TF memory
      growth is turned on).
    """

    address: Optional[str] = None
    connect_timeout_s: float = 15.0
    num_cpus: Optional[int] = None
    workers: Any = "auto"  # "auto" or an integer (OmegaConf has no int|str union)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        _positive("ray.connect_timeout_s", self.connect_timeout_s)
        if self.num_cpus is not None:
            _check(self.num_cpus >= 1, "ray.num_cpus", "an integer >= 1 (or null for all)",
                   self.num_cpus)
        if self.workers in ("auto", 0, "0"):
            self.workers = "auto"
        else:
            try:
                ok = isinstance(self.workers, (int, str)) and int(self.workers) >= 1
            except ValueError:
                ok = False
            _check(ok, "ray.workers", "auto or an integer >= 1", self.workers)
            self.workers = int(self.workers)
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", "a number > 0",
               self.cpus_per_worker)
        _check(self.gpus_per_worker >= 0, "ray.gpus_per_worker", "a number >= 0",
               self.gpus_per_worker)


@dataclass
class FaultsConfig:
    """Surviving failures.

    max_retries: how often a round is re-run after a worker actor died (its
      clients go to a restarted actor; the result is the same, by seeding).
      Past it the run stops with one line, after writing a checkpoint.
    crash_worker_at_round: fault injection for tests and demos: in that round
      worker 0's process exits (a real crash, ``os._exit``) on the first attempt.
    client_dropout: probability that a sampled client goes offline before it
      uploads its update (simulated, seeded; see :mod:`fedsim.cohort.faults`).
    device_speed_sigma: spread of the simulated device times: a client's time
      is ``exp(sigma * N(0, 1))`` times the median device's (0: all equal).
    straggler_timeout: deadline in units of the median device time (e.g. 2.0);
      slower clients are dropped. null: no deadline.
    over_selection: sample ``ceil(clients_per_round * (1 + over_selection))``
      clients and aggregate the first ``clients_per_round`` to finish.
    """

    max_retries: int = 3
    crash_worker_at_round: Optional[int] = None
    client_dropout: float = 0.0
    device_speed_sigma: float = 0.0
    straggler_timeout: Optional[float] = None
    over_selection: float = 0.0

    def __post_init__(self) -> None:
        _check(self.max_retries >= 0, "faults.max_retries", "an integer >= 0",
               self.max_retries)
        _check(0 <= self.client_dropout < 1, "faults.client_dropout",
               "a probability in [0, 1)", self.client_dropout)
        _check(self.device_speed_sigma >= 0, "faults.device_speed_sigma", "a number >= 0",
               self.device_speed_sigma)
        if self.straggler_timeout is not None:
            _positive("faults.straggler_timeout", self.straggler_timeout)
        _check(0 <= self.over_selection <= 10, "faults.over_selection",
               "a fraction in [0, 10] (0.3: sample 30% more clients)", self.over_selection)
        if self.crash_worker_at_round is not None:
            _check(self.crash_worker_at_round >= 1, "faults.crash_worker_at_round",
                   "a round number >= 1 (or null)", self.crash_worker_at_round)


@dataclass
class AggregatorConfig:
    """Which implementation aggregates on the server.

    kind: ``native`` (fedsim's own aggregators, chosen by ``dp``), ``tff`` (a
      TensorFlow Federated aggregation factory run in the server actor), or a
      robust aggregator (:mod:`fedsim.aggregation.robust`; every client counts
      once, ``server.weighting=uniform``): ``median`` (coordinate-wise median),
      ``trimmed_mean`` (coordinate-wise mean after cutting the ``beta`` fraction
      of the values at each end), ``krum`` (the update with the smallest sum of
      squared L2 distances to its n - f - 2 nearest others, Blanchard et al.
      2017), ``multi_krum`` (the mean of the ``select`` updates of smallest Krum
      score) or ``bulyan`` (El Mhamdi et al. 2018: n - 2f updates chosen by
      iterated Krum, then per coordinate the mean of the n - 4f values closest
      to their median).
    factory: ``tff`` only: ``module:callable`` returning a
      ``tff.aggregators.UnweightedAggregationFactory`` or
      ``WeightedAggregationFactory``, e.g.
      ``tensorflow_federated.aggregators:DifferentiallyPrivateFactory.gaussian_adaptive``.
    args: keyword arguments for the callable.
    beta: ``trimmed_mean`` only (required): the fraction of the reporting
      clients' values cut from EACH end of every coordinate, ``floor(beta * n)``
      values (Flower's ``FedTrimmedAvg``, scipy's ``trim_mean``); in [0, 0.5).
    byzantine: ``krum``, ``multi_krum``, ``bulyan`` only (required): f, the
      number of Byzantine clients tolerated, an integer >= 0. Krum needs more
      than 2f + 2 reporting clients, Bulyan at least 4f + 3; a round with fewer
      reporters (dropouts) uses the largest f they allow (the ``robust_f``
      measurement).
    select: ``multi_krum`` only: m, how many updates of lowest Krum score are
      averaged; null: n - f (of the round's n reporting clients).
    clip: robust kinds only: each update is scaled to L2 norm at most ``clip``
      (in the model's parameter units) before it is aggregated; null: no clip.
    """

    kind: str = "native"
    factory: Optional[str] = None
    args: dict[str, Any] = field(default_factory=dict)
    beta: Optional[float] = None
    byzantine: Optional[int] = None
    select: Optional[int] = None
    clip: Optional[float] = None

    # which robust kinds take each option (the others must leave it null)
    _USES = {"beta": ("trimmed_mean",), "byzantine": ("krum", "multi_krum", "bulyan"),
             "select": ("multi_krum",), "clip": ROBUST_AGGREGATORS}

    def __post_init__(self) -> None:
        _one_of("aggregator.kind", self.kind, AGGREGATORS)
        if self.kind == "tff":
            _check(bool(self.factory) and ":" in str(self.factory), "aggregator.factory",
                   "module:callable naming a TFF aggregation factory", self.factory)
        for option, kinds in self._USES.items():
            if self.kind not in kinds:
                _check(getattr(self, option) is None, f"aggregator.{option}",
                       f"null with aggregator.kind={self.kind} (an option of "
                       f"{', '.join(kinds)})", getattr(self, option))
        if self.kind == "trimmed_mean":
            _check(isinstance(self.beta, (int, float)) and not isinstance(self.beta, bool)
                   and 0 <= self.beta < 0.5, "aggregator.beta", "a fraction in [0, 0.5) "
                   "cut from each end with aggregator.kind=trimmed_mean", self.beta)
        if self.kind in self._USES["byzantine"]:
            _check(isinstance(self.byzantine, int) and not isinstance(self.byzantine, bool)
                   and self.byzantine >= 0, "aggregator.byzantine", "an integer >= 0 (f, "
                   f"the Byzantine clients tolerated) with aggregator.kind={self.kind}",
                   self.byzantine)
        if self.select is not None:
            _check(isinstance(self.select, int) and not isinstance(self.select, bool)
                   and self.select >= 1, "aggregator.select",
                   "an integer >= 1 (or null: n - f)", self.select)
        if self.clip is not None:
            _positive("aggregator.clip", self.clip)

    @property
    def robust(self) -> bool:
        """A robust aggregator (not a sum: no secure aggregation, no central DP)."""
        return self.kind in ROBUST_AGGREGATORS


@dataclass
class AuditConfig:
    """Empirical privacy estimation with canary clients (Andrew et al., ICLR 2024).

    kind: ``none`` or ``canary``: ``canaries`` extra clients join the population;
      a canary's update is a fixed random direction of L2 norm ``canary_norm``
      (null: the DP clip, so clipping leaves it whole), sampled like any client.
      At the end the cosines between the final model delta and the canary
      directions, against ``null_directions`` unseen random directions, give an
      empirical epsilon reported beside the accountant's.
    """

    kind: str = "none"
    canaries: int = 100
    null_directions: int = 1000
    canary_norm: Optional[float] = None

    def __post_init__(self) -> None:
        _one_of("audit.kind", self.kind, AUDITS)
        _check(self.canaries >= 2, "audit.canaries", "an integer >= 2", self.canaries)
        _check(self.null_directions >= 2, "audit.null_directions", "an integer >= 2",
               self.null_directions)
        if self.canary_norm is not None:
            _positive("audit.canary_norm", self.canary_norm)


@dataclass
class TrackingConfig:
    """Experiment tracking (:mod:`fedsim.results.tracking`): ``tracking=mlflow``.

    kind: ``none`` or ``mlflow``: each run is one MLflow run holding the resolved
      config (flattened, as params), every round's metrics (step = round), and
      as artifacts ``summary.json``, ``metrics.png`` and the final weights.
    uri: the MLflow tracking URI (e.g. ``http://127.0.0.1:5000``, or
      ``file:///abs/path/mlruns`` for a local file store); null: a file store
      ``mlruns/`` in the run directory, or, for a point of a Hydra multirun, in
      the sweep directory, shared by all its points (set by ``scripts/simulate.py``).
    experiment: the MLflow experiment's name (created if missing).
    run_name: the MLflow run's name; null: MLflow's own.
    tags: extra tags of the MLflow run (``scripts/simulate.py`` adds a multirun
      point's Hydra overrides as ``override.<key>``, and the sweep directory).
    """

    kind: str = "none"
    uri: Optional[str] = None
    experiment: str = "fedsim"
    run_name: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of("tracking.kind", self.kind, TRACKERS)
        _check(self.uri is None or (isinstance(self.uri, str) and self.uri != ""),
               "tracking.uri", "null (a file store in the run or sweep directory) or a "
               "tracking URI", self.uri)
        _check(isinstance(self.experiment, str) and self.experiment.strip() != "",
               "tracking.experiment", "a non-empty experiment name", self.experiment)
        self.tags = {str(k): str(v) for k, v in dict(self.tags).items()}


@dataclass
class FederatedEvalConfig:
    """Evaluation of the global model on the clients' OWN test data, in the
    worker actors, every ``eval_every`` rounds (as TFF's federated evaluation;
    the central test split is evaluated as well).

    clients: how many clients to evaluate: 0 (off), an integer (that many of
      the population, sampled without replacement from the stream
      ``(seed, EVAL_CLIENTS, round)``, the same for every run of the seed) or
      ``all``. Needs data whose clients hold test splits of their own (the
      ``client_test`` capability, :class:`fedsim.data.base.ClientData`).
      Clients without test examples are skipped.
    personalization_steps: k > 0 also evaluates each of those clients after k
      steps of plain SGD (batches of ``batch_size``, rate
      ``personalization_lr``) on its own training data, starting from the
      global model (TFF's personalization evaluation), reported with the
      prefix ``pers_``. 0: off.
    personalization_lr: the fine-tuning rate; null: ``client.learning_rate``.
    batch_size: evaluation batch size (it changes nothing but memory and speed).

    Each metric (and the loss) is reported as ``fed_<metric>`` (the mean over
    all evaluated examples, or for ratio metrics the ratio of the sums),
    ``fed_<metric>_mean`` (the unweighted mean over clients) and
    ``fed_<metric>_p10``/``_p50``/``_p90`` (percentiles across clients, numpy's
    linear interpolation); ``fed_clients`` counts the clients evaluated.
    """

    clients: Any = 0
    personalization_steps: int = 0
    personalization_lr: Optional[float] = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(self.clients == "all" or (isinstance(self.clients, int)
                                         and not isinstance(self.clients, bool)
                                         and self.clients >= 0),
               "federated_eval.clients", "0 (off), an integer >= 1 or all", self.clients)
        _check(isinstance(self.personalization_steps, int) and self.personalization_steps >= 0,
               "federated_eval.personalization_steps", "an integer >= 0 (0: off)",
               self.personalization_steps)
        _check(self.personalization_lr is None or self.personalization_lr > 0,
               "federated_eval.personalization_lr", "null or a number > 0",
               self.personalization_lr)
        _check(self.batch_size >= 1, "federated_eval.batch_size", "an integer >= 1",
               self.batch_size)
        _check(self.personalization_steps == 0 or self.clients != 0,
               "federated_eval.personalization_steps", "0 while federated_eval.clients=0 "
               "(personalization evaluates the clients federated evaluation visits)",
               self.personalization_steps)

    @property
    def enabled(self) -> bool:
        return self.clients != 0


@dataclass
class AlgorithmConfig:
    """The federated algorithm (:mod:`fedsim.algorithms`); the server optimizer
    that applies its aggregate is ``server``.

    name: ``fedavg``; ``fedprox`` (Li et al. 2020: the clients' objective gains
      ``mu/2 ||w - w_global||^2``); ``scaffold`` (Karimireddy et al. 2020, option
      II: server and per-client control variates); ``mime_lite`` (Karimireddy et
      al. 2021: the clients step with the server's momentum, kept fixed during
      local training); or a user's ``module:callable`` (called with the run's
      :class:`SimConfig` and ``args``; :func:`fedsim.algorithms.base.resolve_algorithm`).
    mu: fedprox's proximal strength (>= 0; 0 is FedAvg).
    state_dir: where stateful algorithms (scaffold) keep every client's state,
      on disk, sharded by client id (:mod:`fedsim.client.state`); null: the run
      directory's ``client_state/`` (a temporary directory when the run writes no
      outputs). It is checkpointed with the run.
    state_shard_clients: clients per shard file of that store.
    args: keyword arguments for a user's ``module:callable``.
    """

    name: str = "fedavg"
    mu: float = 0.0
    state_dir: Optional[str] = None
    state_shard_clients: int = 4096
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if ":" not in self.name:  # module:callable: a user's algorithm
            _one_of("algorithm.name", self.name, ALGORITHMS)
        _check(self.mu >= 0, "algorithm.mu", "a number >= 0", self.mu)
        if self.mu > 0 and ":" not in self.name:
            _check(self.name == "fedprox", "algorithm.mu",
                   f"0 with algorithm.name={self.name} (mu is fedprox's proximal strength)",
                   self.mu)
        _check(self.state_shard_clients >= 1, "algorithm.state_shard_clients",
               "an integer >= 1", self.state_shard_clients)
        if ":" not in self.name:
            _check(not self.args, "algorithm.args", "{} with a built-in algorithm (args go "
                   "to a user's module:callable)", self.args)


@dataclass
class SamplingConfig:
    """Which clients take part in each round (:mod:`fedsim.cohort.sampling`).

    scheme: ``uniform`` (exactly clients_per_round clients, without
      replacement); ``poisson`` (each client independently with probability
      clients_per_round / clients); ``epochs`` (each epoch of clients //
      clients_per_round rounds shuffles the population and deals it out: a
      client takes part at most once per epoch, the clients % clients_per_round
      left over sit it out); ``min_sep`` (clients in min_sep fixed groups, round
      t draws clients_per_round of group (t - 1) mod min_sep: a client takes part
      at most once every min_sep rounds). epochs and min_sep bound how often a
      client takes part (what DP-FTRL and matrix-factorization mechanisms
      assume) and give no amplification by sampling.
    min_sep: min_sep's separation b, an integer >= 1 with ``clients_per_round <=
      clients // b`` (checked by :class:`SimConfig`); null for the other schemes.
    """

    scheme: str = "uniform"
    min_sep: Optional[int] = None

    def __post_init__(self) -> None:
        _one_of("sampling.scheme", self.scheme, SAMPLING)
        if self.scheme == "min_sep":
            _check(isinstance(self.min_sep, int) and not isinstance(self.min_sep, bool)
                   and self.min_sep >= 1, "sampling.min_sep", "an integer >= 1 with "
                   "sampling=min_sep (a client takes part at most once every min_sep rounds)",
                   self.min_sep)
        else:
            _check(self.min_sep is None, "sampling.min_sep", f"null with sampling={self.scheme} "
                   "(min_sep is the separation of sampling=min_sep)", self.min_sep)


@dataclass
class SimConfig:
    """One federated simulation.

    clients: size of the client population. clients_per_round: how many are
    sampled each round (the expected number under Poisson sampling).
    sampling: who takes part in each round (:class:`SamplingConfig`: uniform,
    poisson, epochs or min_sep; from Python a scheme name is short for
    ``SamplingConfig(scheme)``).
    rounds: federated rounds. local_epochs: passes over each client's data per
    round. batch_size: client minibatch size. eval_every: evaluate the global
    model on the test split every k rounds (and after the last round).
    memory_every: every k rounds, record the resident memory (MiB) of the
    driver, the server actor and the workers (summed) in the metrics (0: off).
    seed: root of every random stream (data split, sampling, init, shuffling).
    checkpoint_every: write a checkpoint (``checkpoint.json`` and its
      ``checkpoint-<sha256>.npz``, :mod:`fedsim.results.checkpoint`) into the run
      directory every k rounds and after the last (0: only after the last).
    resume: a run directory to continue from its checkpoint (outputs go there).
    resume_force: allow resuming with changed privacy parameters (dp, sampling,
      clients, clients_per_round); the ledger then records both.
    algorithm: the federated algorithm (:class:`AlgorithmConfig`; from Python a
      name is short for ``AlgorithmConfig(name)``).
    federated_eval: evaluation on the clients' own test data
      (:class:`FederatedEvalConfig`).
    tracking: experiment tracking (:class:`TrackingConfig`: none or mlflow).
    """

    clients: int = 100
    clients_per_round: int = 10
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rounds: int = 60
    local_epochs: int = 5
    batch_size: int = 10
    eval_every: int = 1
    memory_every: int = 0
    seed: int = 0
    progress: bool = True
    checkpoint_every: int = 10
    resume: Optional[str] = None
    resume_force: bool = False
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    federated_eval: FederatedEvalConfig = field(default_factory=FederatedEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tensorboard: bool = False

    def __post_init__(self) -> None:
        _check(self.clients >= 1, "clients", "an integer >= 1", self.clients)
        _check(1 <= self.clients_per_round <= self.clients, "clients_per_round",
               f"an integer in [1, clients={self.clients}]", self.clients_per_round)
        if isinstance(self.sampling, str):  # (from Python: a scheme name is enough)
            self.sampling = SamplingConfig(scheme=self.sampling)
        self._check_sampling()
        if isinstance(self.algorithm, str):  # (from Python: a name is enough)
            self.algorithm = AlgorithmConfig(name=self.algorithm)
        _check(self.rounds >= 1, "rounds", "an integer >= 1", self.rounds)
        _check(self.local_epochs >= 1, "local_epochs", "an integer >= 1", self.local_epochs)
        _check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        _check(self.eval_every >= 1, "eval_every", "an integer >= 1", self.eval_every)
        _check(self.memory_every >= 0, "memory_every", "an integer >= 0 (0: off)",
               self.memory_every)
        _check(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _check(self.checkpoint_every >= 0, "checkpoint_every",
               "an integer >= 0 (0: only after the last round)", self.checkpoint_every)
        if self.aggregator.kind == "tff":
            self._check_tff()
        self._check_robust()
        if self.client.optimizer == "dp_sgd" and self.client.num_microbatches is not None:
            _check(self.batch_size % self.client.num_microbatches == 0,
                   "client.num_microbatches", f"a divisor of batch_size={self.batch_size}",
                   self.client.num_microbatches)
        if self.audit.kind == "canary":
            _check(self.dp.mechanism != "distributed_skellam", "audit.kind",
                   "none with dp=distributed_skellam (canaries join the central sum)",
                   self.audit.kind)
            _check(self.sampling.scheme in ("uniform", "poisson"), "audit.kind",
                   f"none with sampling={self.sampling.scheme} (canaries join each round "
                   "independently, as Poisson-sampled add/remove neighbours)", self.audit.kind)
        if self.faults.over_selection > 0:
            _check(self.sampling.scheme == "uniform", "faults.over_selection",
                   f"0 with sampling={self.sampling.scheme} (over-selection adds clients to a "
                   "uniform fixed-size cohort)", self.faults.over_selection)
        self._check_dp()
        self._check_algorithm()
        if self.secagg.protocol != "none":
            _check(self.server.weighting == "uniform", "server.weighting",
                   "uniform with secure aggregation (the secure sum carries unweighted "
                   "updates; the secagg configs set it)", self.server.weighting)

    def _check_sampling(self) -> None:
        """min_sep's groups must each hold a cohort. (epochs needs clients_per_round
        <= clients, as every scheme does: checked above.)"""
        b = self.sampling.min_sep
        if self.sampling.scheme == "min_sep" and b is not None:
            _check(self.clients_per_round <= self.clients // b, "sampling.min_sep",
                   f"an integer in [1, clients // clients_per_round = "
                   f"{self.clients // self.clients_per_round}] with clients={self.clients} and "
                   f"clients_per_round={self.clients_per_round} (each of the min_sep groups "
                   "must hold a round's cohort)", b)

    def _check_tff(self) -> None:
        """A TFF factory is the whole aggregator, its DP included: fedsim's own DP
        options would be a second, conflicting mechanism."""
        _check(self.dp.mechanism == "none", "dp.mechanism",
               "none with aggregator.kind=tff (the TFF factory adds its own noise; its "
               "DpEvents go to the accountant)", self.dp.mechanism)
        _check(self.dp.target_epsilon is None and self.dp.max_epsilon is None,
               "dp.target_epsilon", "null (and dp.max_epsilon null) with aggregator.kind=tff "
               "(fedsim cannot predict the factory's events)", self.dp.target_epsilon)
        _check(self.secagg.protocol == "none", "secagg.protocol",
               "none with aggregator.kind=tff (wrap the factory in TFF's SecureSumFactory "
               "instead)", self.secagg.protocol)
        if self.audit.kind == "canary":
            _check(self.audit.canary_norm is not None, "audit.canary_norm",
                   "a number with aggregator.kind=tff (fedsim does not know the factory's "
                   "clip)", self.audit.canary_norm)

    def _check_algorithm(self) -> None:
        """What each built-in algorithm composes with (README: "Algorithms")."""
        name = self.algorithm.name
        if name == "fedavg" or ":" in name:  # a user's: its client_features are checked
            return
        _check(self.client.optimizer == "sgd", "client.optimizer",
               f"sgd with algorithm.name={name} (its client steps are not DP-SGD's)",
               self.client.optimizer)
        _check(self.client.per_call <= 1, "client.vectorize",
               f"0 or 1 with algorithm.name={name} (the vectorized trainer runs plain "
               "FedAvg steps)", self.client.vectorize)
        if name == "fedprox":
            return
        # scaffold and mime_lite: each client sends a second vector (the control
        # variate's change; the full gradient) that no DP aggregator clips or noises
        # and that the secure sum does not carry.
        _check(self.dp.mechanism == "none", "dp.mechanism",
               f"none with algorithm.name={name} (each client also sends "
               f"{'its control-variate update' if name == 'scaffold' else 'its full gradient'}"
               ", a release the DP aggregators neither clip nor noise)", self.dp.mechanism)
        _check(self.secagg.protocol == "none", "secagg.protocol",
               f"none with algorithm.name={name} (the secure sum carries only the model "
               "update)", self.secagg.protocol)
        _check(self.aggregator.kind == "native", "aggregator.kind",
               f"native with algorithm.name={name} (its second vector is averaged beside "
               "the model update)", self.aggregator.kind)
        _check(self.audit.kind == "none", "audit.kind", f"none with algorithm.name={name} "
               "(the canary audit needs a DP aggregator)", self.audit.kind)
        if name == "scaffold":
            _check(self.client.momentum == 0, "client.momentum",
                   "0 with algorithm.name=scaffold (its control variate (x - y_i) / (K lr) "
                   "assumes plain SGD steps)", self.client.momentum)

    def _check_robust(self) -> None:
        """A robust aggregate is not a sum: it cannot run inside secure aggregation
        (which reveals only the sum) nor under central DP (no sensitivity analysis
        of it is stated; the accountant would charge a Gaussian sum that is not
        what is released). It counts every client once, and canaries would be
        outvoted. Krum needs n > 2f + 2 and Bulyan n >= 4f + 3 clients."""
        agg = self.aggregator
        if not agg.robust:
            return
        kind = f"aggregator.kind={agg.kind}"
        _check(self.secagg.protocol == "none", "secagg.protocol", f"none with {kind} (secure "
               "aggregation reveals only the sum, a robust aggregate needs every update)",
               self.secagg.protocol)
        _check(self.dp.mechanism == "none", "dp.mechanism", f"none with {kind} (no "
               "sensitivity analysis of a robust aggregate is stated, and the accountant "
               "would be charged for a Gaussian sum that is not what is released)",
               self.dp.mechanism)
        _check(self.server.weighting == "uniform", "server.weighting", f"uniform with {kind} "
               "(robust aggregators ignore example weights; the aggregator configs set it)",
               self.server.weighting)
        _check(self.audit.kind == "none", "audit.kind", f"none with {kind} (canaries "
               "would be outvoted by the robust aggregate, not added to a sum)",
               self.audit.kind)
        n, f = self.clients_per_round, agg.byzantine or 0  # (checked: set for Krum, Bulyan)
        if agg.kind in ("krum", "multi_krum", "bulyan"):
            _check(n >= 3, "clients_per_round", f"an integer >= 3 with {kind} (Krum and "
                   "Bulyan need more than 2f + 2 and at least 4f + 3 clients)", n)
        if agg.kind in ("krum", "multi_krum"):
            _check(n > 2 * f + 2, "aggregator.byzantine", f"an integer in [0, "
                   f"{max((n - 3) // 2, 0)}] with {kind} and clients_per_round={n} (Krum "
                   "needs more than 2f + 2 reporting clients)", agg.byzantine)
        if agg.kind == "bulyan":
            _check(n >= 4 * f + 3, "aggregator.byzantine", f"an integer in [0, "
                   f"{max((n - 3) // 4, 0)}] with {kind} and clients_per_round={n} (Bulyan "
                   "needs at least 4f + 3 reporting clients)", agg.byzantine)
        if agg.select is not None:
            _check(agg.select <= n - f, "aggregator.select",
                   f"an integer in [1, clients_per_round - byzantine = {n - f}] "
                   "(or null: n - f)", agg.select)

    def noise_root(self) -> int:
        """The root of the privacy-noise streams (``dp.noise_seed``, resolved; the
        driver replaces ``os`` by fresh entropy before the actors see it)."""
        if self.dp.noise_seed == "run":
            return self.seed
        if self.dp.noise_seed == "os":
            raise ValueError("dp.noise_seed=os must be resolved by the driver first")
        return int(self.dp.noise_seed)

    def _check_dp(self) -> None:
        dp = self.dp
        if dp.noise_sampler == "discrete_gaussian":
            _check(dp.mechanism == "gaussian" and self.secagg.protocol != "none",
                   "dp.noise_sampler", "float64 unless dp=gaussian with secagg=secagg or "
                   "secagg=secagg_plus (discrete Gaussian noise is added to the unmasked "
                   "integer sum)", dp.noise_sampler)
            _check(dp.accountant == "rdp", "dp.accountant",
                   "rdp with dp.noise_sampler=discrete_gaussian (its bound is an RDP bound)",
                   dp.accountant)
            _check(dp.target_epsilon is None, "dp.target_epsilon",
                   "null with dp.noise_sampler=discrete_gaussian (set dp.noise_multiplier)",
                   dp.target_epsilon)
            _check(self.audit.kind == "none", "audit.kind",
                   "none with dp.noise_sampler=discrete_gaussian (the noise is in the secure "
                   "sum before the canaries could join it)", self.audit.kind)
        if dp.mechanism == "none":
            return
        _check(self.server.weighting == "uniform", "server.weighting",
               "uniform when dp.mechanism is not none (DP aggregation weighs every client "
               "equally, as TFF's DifferentiallyPrivateFactory)", self.server.weighting)
        if dp.mechanism == "distributed_skellam":
            _check(self.secagg.protocol != "none", "dp.mechanism",
                   "distributed_skellam only with secagg=secagg or secagg=secagg_plus (the "
                   "clients' noise shares are added inside secure aggregation)", dp.mechanism)
            _check(dp.accountant == "rdp", "dp.accountant",
                   "rdp with distributed_skellam (its privacy bound is an RDP bound)",
                   dp.accountant)
            _check(self.sampling.scheme == "uniform", "sampling",
                   "uniform with distributed_skellam (its bound compares neighbouring "
                   "cohorts of equal size, each client adding one noise share; under "
                   "Poisson sampling removing a client also removes its share)",
                   self.sampling.scheme)
            _check(dp.target_epsilon is None, "dp.target_epsilon",
                   "null with distributed_skellam (its bound depends on the model size; "
                   "set dp.noise_multiplier)", dp.target_epsilon)
        if dp.accountant == "pld":
            _check(self.sampling.scheme != "uniform", "dp.accountant",
                   "rdp with sampling=uniform (dp-accounting's PLD accountant has no "
                   "sampling without replacement); use sampling=poisson for pld",
                   dp.accountant)
        if dp.mechanism == "gaussian_adaptive":
            from fedsim.privacy.noise import adaptive_clip_noise_params

            try:
                adaptive_clip_noise_params(dp.noise_multiplier, self.clients_per_round,
                                           dp.clipped_count_stddev)
            except ValueError:
                count_std = (dp.clipped_count_stddev if dp.clipped_count_stddev is not None
                             else 0.05 * self.clients_per_round)
                raise ConfigError(
                    "dp.noise_multiplier",
                    f"less than 2 * clipped_count_stddev = {2 * count_std:g}: "
                    f"clipped_count_stddev = {count_std:g} (defaults to 0.05 * "
                    "clients_per_round if not specified) is too low to achieve the desired "
                    "effective noise_multiplier; increase dp.clipped_count_stddev or "
                    "decrease dp.noise_multiplier", dp.noise_multiplier) from None


def saved_sampling_scheme(saved: Any) -> Optional[str]:
    """The sampling scheme a stored config names: its ``sampling`` is a
    :class:`SamplingConfig` as a dict, or (checkpoints written before sampling
    was a config group) the scheme's name; None if absent."""
    if isinstance(saved, dict):
        return saved.get("scheme")
    return saved if isinstance(saved, str) else None


def why(err: BaseException) -> str:
    """An exception as one short line: its type and its first line."""
    first = (str(err).splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def import_callable(path: str, option: str) -> Any:
    """The object ``module.path:attr.path`` names (a user's part named in the
    config); one-line ConfigError naming ``option`` if it cannot be imported or
    found."""
    if not isinstance(path, str) or CALLABLE_PATH.fullmatch(path) is None:
        raise ConfigError(option, "a built-in name or module:callable (e.g. "
                          "my_pkg.models:build)", path)
    module_name, attr_path = path.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # ModuleNotFoundError, or the module itself failed
        raise ConfigError(option, f"an importable module before ':' (importing "
                          f"{module_name!r} failed: {why(err)}; is its "
                          "directory on PYTHONPATH?)", path) from err
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(option, f"an attribute that exists ({part!r} not found in "
                              f"{getattr(obj, '__name__', type(obj).__name__)!r})", path)
        obj = getattr(obj, part)
    return obj


def build_named(path: str, option: str, kind: type, *args: Any, **kwargs: Any) -> Any:
    """The ``kind`` object that ``module:callable`` names: the attribute itself if
    it is one, else what calling it with ``args`` returns (a subclass of
    ``kind`` or a factory); one-line ConfigError naming ``option`` otherwise."""
    obj = import_callable(path, option)
    if isinstance(obj, type) and not issubclass(obj, kind):
        made: Any = obj  # a class of something else: not called
    else:
        made = obj(*args, **kwargs) if callable(obj) and not isinstance(obj, kind) else obj
    if not isinstance(made, kind):
        got = made.__name__ if isinstance(made, type) else type(made).__name__
        raise ConfigError(option, f"a {kind.__module__}.{kind.__qualname__} (or a callable "
                          f"returning one); {path} gives {got}", path)
    return made

"""What fedsim needs to know about the model clients train: :class:`ModelSpec`.

A ModelSpec is the one place that says how a model is built, how it is trained
(its per-example loss) and how it is evaluated (per-example metrics). Every
trainer (:class:`fedsim.client.local.LocalTrainer`,
:class:`fedsim.client.dp_sgd.DPSGDTrainer`,
:class:`fedsim.client.vectorized.VectorizedTrainer`) and the server's evaluation
(:class:`fedsim.engine.server.Server`) take one, so a user's own model plugs in
without touching fedsim::

    def build(input_shape, num_classes, seed):      # -> tf.keras.Model, logits out
        ...
    run_simulation(cfg, model=build)                 # default loss and metrics
    run_simulation(cfg, model=ModelSpec(build, loss=my_loss))

or from the command line ``model=keras model.builder=my_pkg.models:build``
(:func:`model_spec` resolves the three ways). The built-in ``logreg``, ``mlp``
and ``cnn`` are ModelSpecs around :func:`fedsim.models.keras.build_model`.

This module imports TensorFlow only inside the functions that build or run a
model: the driver resolves and checks a spec (and counts the built-ins'
parameters, :meth:`BuiltinModel.num_parameters`) without starting TF.

Contract of a spec's parts (all TF ops, traced into the trainers' graphs):

* ``builder(input_shape, num_classes, seed) -> tf.keras.Model``: a fresh model
  for float32 inputs of ``input_shape`` (no batch axis) whose output is
  ``[batch, num_classes]`` logits. Sequential, functional and subclassed models
  all work. Seed its initializers from ``seed``: the server's copy is the
  initial global model, so a seeded builder makes runs reproducible. Weights
  travel as the flat vector of ``model.trainable_variables``; non-trainable
  state (e.g. batch-norm statistics) stays in each process and is not
  federated, and layers that mix examples (batch normalization) break the
  per-example clipping of DP-SGD.
* ``loss(y_true, logits) -> [batch]``: the loss of each example (not reduced),
  y_true int32 labels ``[batch]``. Trainers sum it and divide by the batch
  size (minibatch SGD on the mean loss); DP-SGD takes it per microbatch; the
  reported ``train_loss`` and ``eval_loss`` are means per example.
* ``metrics``: name -> ``metric(y_true, logits) -> [batch]``, one value per
  example; the server reports the mean over the test split as
  ``eval_<name>``. fedsim's summary and plot read ``eval_accuracy``, so keep
  ``accuracy`` when adding your own.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from fedsim.config import ModelConfig, import_callable, why
from fedsim.errors import ConfigError


def sparse_categorical_crossentropy(y_true: Any, logits: Any) -> Any:
    """Per-example cross-entropy of integer labels on logits, ``[batch]``
    (Keras' ``SparseCategoricalCrossentropy(from_logits=True)``, reduction NONE:
    its sum is bit for bit the SUM-reduced loss fedsim used before specs)."""
    import tensorflow as tf

    return tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE)(y_true, logits)


def accuracy(y_true: Any, logits: Any) -> Any:
    """1.0 where ``argmax(logits) == y_true``, else 0.0, per example (float32)."""
    import tensorflow as tf

    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(predicted, tf.cast(y_true, tf.int32)), tf.float32)


def _default_metrics() -> dict[str, Callable]:
    return {"accuracy": accuracy}


@dataclass(frozen=True)
class ModelSpec:
    """A model and how to train and evaluate it (see the module docstring).

    builder: ``(input_shape, num_classes, seed) -> tf.keras.Model`` (logits).
    loss: per-example loss ``(y_true, logits) -> [batch]``; default
      :func:`sparse_categorical_crossentropy`.
    metrics: name -> per-example metric ``(y_true, logits) -> [batch]``;
      default ``{"accuracy": accuracy}``.
    name: what the model is called (default: the builder's name).

    Everything must pickle (cloudpickle, as Ray sends it to the actors):
    module-level functions, or closures over picklable values.
    """

    builder: Callable[..., Any]
    loss: Callable[[Any, Any], Any] = sparse_categorical_crossentropy
    metrics: Mapping[str, Callable[[Any, Any], Any]] = field(
        default_factory=_default_metrics, hash=False)
    name: str = ""

    def __post_init__(self) -> None:
        if not callable(self.builder):
            raise ConfigError("model", "a builder callable (input_shape, num_classes, seed) "
                              "-> tf.keras.Model", type(self.builder).__name__)
        if not callable(self.loss):
            raise ConfigError("model.loss", "a callable (y_true, logits) -> per-example "
                              "losses", type(self.loss).__name__)
        if not isinstance(self.metrics, Mapping) or not all(
                isinstance(k, str) and k.isidentifier() and callable(v)
                for k, v in self.metrics.items()):
            raise ConfigError("model.metrics", "a mapping of names (identifiers) to callables "
                              "(y_true, logits) -> per-example values", self.metrics)
        object.__setattr__(self, "metrics", dict(self.metrics))
        if not self.name:
            object.__setattr__(self, "name", str(getattr(
                self.builder, "name", getattr(self.builder, "__qualname__",
                                              type(self.builder).__name__))))

    @property
    def is_builtin(self) -> bool:
        """True for fedsim's own logreg, mlp and cnn with the default loss."""
        return (isinstance(self.builder, BuiltinModel)
                and self.loss is sparse_categorical_crossentropy)

    def build(self, input_shape: Sequence[int], num_classes: int, seed: int) -> Any:
        """A fresh, built ``tf.keras.Model`` (a subclassed model is called once on a
        zero batch so that its variables exist)."""
        import tensorflow as tf

        model = self.builder(tuple(int(d) for d in input_shape), int(num_classes), int(seed))
        if not isinstance(model, tf.keras.Model):
            raise TypeError(f"the builder returned a {type(model).__name__}, not a "
                            "tf.keras.Model")
        if not model.built:
            model(tf.zeros([1, *input_shape], tf.float32), training=False)
        return model

    def num_parameters(self, input_shape: Sequence[int], num_classes: int, seed: int) -> int:
        """Trainable parameters (the length of the flat weight vector). Built-ins
        count without TensorFlow; a builder with a ``num_parameters(input_shape,
        num_classes, seed)`` attribute is asked; otherwise the model is built."""
        count = getattr(self.builder, "num_parameters", None)
        if callable(count):
            return int(count(tuple(input_shape), int(num_classes), int(seed)))
        from fedsim.models.keras import count_parameters

        return count_parameters(self.build(input_shape, num_classes, seed))


@dataclass(frozen=True)
class BuiltinModel:
    """The builder of fedsim's own ``logreg``, ``mlp`` and ``cnn``: calls
    :func:`fedsim.models.keras.build_model` with the ModelConfig it was made from."""

    name: str
    hidden: tuple[int, ...] = (200, 200)
    filters: tuple[int, ...] = (32, 64)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "BuiltinModel":
        return cls(cfg.name, tuple(int(h) for h in cfg.hidden),
                   tuple(int(f) for f in cfg.filters))

    def config(self) -> ModelConfig:
        return ModelConfig(name=self.name, hidden=list(self.hidden), filters=list(self.filters))

    def __call__(self, input_shape: Sequence[int], num_classes: int, seed: int) -> Any:
        from fedsim.models.keras import build_model

        return build_model(self.config(), input_shape, num_classes, seed)

    def num_parameters(self, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> int:
        """The parameter count of :func:`fedsim.models.keras.build_model`'s layers,
        computed from the shapes alone (no TensorFlow)."""
        shape = tuple(int(d) for d in input_shape)
        c = int(num_classes)
        if self.name == "cnn":
            if len(shape) != 3:
                raise ConfigError("model", "logreg or mlp for non-image data of shape "
                                  f"{shape} (cnn needs height x width x channels)", "cnn")
            h, w, channels = shape
            size, total = min(h, w), 0
            for f in self.filters:  # 3x3 conv, same padding, then 2x2 max pool
                total += 9 * channels * f + f
                channels = f
                if size >= 2:
                    h, w, size = h // 2, w // 2, size // 2
            flat = h * w * channels
            return total + flat * 128 + 128 + 128 * c + c
        prev, total = math.prod(shape), 0
        for units in (self.hidden if self.name == "mlp" else ()):
            total += prev * units + units
            prev = units
        return total + prev * c + c


def builtin_spec(cfg: ModelConfig) -> ModelSpec:
    """The ModelSpec of a built-in ``cfg.name`` (logreg, mlp, cnn)."""
    return ModelSpec(BuiltinModel.from_config(cfg), name=cfg.name)


@contextlib.contextmanager
def _quiet_tensorflow_start() -> Iterator[None]:
    """If TensorFlow is not imported yet, import-time C++ logs stay quiet.

    TF's CUDA builds log "Unable to register cuDNN factory" and the like at
    level E when they start; in the driver, which starts TF only to check a
    user's model, those lines would come before the one-line error. The actors
    already run at ``TF_CPP_MIN_LOG_LEVEL=3`` (:func:`fedsim.simulation.connect_ray`);
    TF reads the level once, at its first log line, so the driver's TF stays at 3
    too. The environment variable is restored afterwards."""
    if "tensorflow" in sys.modules:
        yield
        return
    old = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = old


def _import_callable(path: str, option: str) -> Any:
    """:func:`fedsim.config.import_callable`, keeping TensorFlow's import-time C++
    messages out of the driver's stderr (a builder's module may import TF)."""
    with _quiet_tensorflow_start():
        return import_callable(path, option)


def as_spec(model: Any, option: str = "model") -> ModelSpec:
    """A ModelSpec as given, or a builder callable wrapped with the default loss
    and metrics; anything else is a one-line ConfigError naming ``option``."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, ModelConfig):
        return model_spec(model)
    if isinstance(model, types.ModuleType) or not callable(model):
        raise ConfigError(option, "a fedsim.models.spec.ModelSpec or a builder callable "
                          "(input_shape, num_classes, seed) -> tf.keras.Model",
                          type(model).__name__)
    return ModelSpec(model)


def model_spec(cfg_model: ModelConfig, model: Any = None) -> ModelSpec:
    """The ModelSpec a run trains.

    1. ``model`` (from Python: ``run_simulation(cfg, model=...)``), a ModelSpec or a
       builder callable (wrapped with the default loss and metrics);
    2. else ``cfg_model.builder`` (``model=keras model.builder=module:callable``),
       imported here: a ModelSpec, or a builder callable;
    3. else the built-in ``cfg_model.name``.

    Errors are one-line ConfigErrors naming ``model`` or ``model.builder``.
    Imports the builder's module (and whatever it imports), never TF itself.
    """
    if model is not None:
        if cfg_model.builder is not None:
            raise ConfigError("model.builder", "null when a model is passed from Python "
                              "(run_simulation's model=): one model per run",
                              cfg_model.builder)
        return as_spec(model, "model")
    if cfg_model.builder is not None:
        obj = _import_callable(cfg_model.builder, "model.builder")
        if isinstance(obj, ModelSpec):
            return obj
        if not callable(obj) or isinstance(obj, types.ModuleType):
            raise ConfigError("model.builder", "a callable (input_shape, num_classes, seed) "
                              f"-> tf.keras.Model, or a ModelSpec (got a {type(obj).__name__})",
                              cfg_model.builder)
        return ModelSpec(obj, name=cfg_model.builder)
    return builtin_spec(cfg_model)


def check_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int, seed: int,
                option: str = "model", batch: int = 2) -> int:
    """Build ``spec``'s model once and run it, its loss and its metrics on a batch
    of zeros; returns the parameter count. Refuses, with a one-line ConfigError
    naming ``option``, a builder that fails or does not return a Keras model, a
    model whose output is not ``[batch, num_classes]`` logits, a model without
    trainable weights, and a loss or metric that is not one value per example.
    Imports TensorFlow (the driver calls it for users' models only)."""
    import numpy as np

    with _quiet_tensorflow_start():
        import tensorflow as tf
    _tf_shares_gpus()
    try:
        model = spec.build(input_shape, num_classes, seed)
    except Exception as err:
        raise ConfigError(option, f"a builder that builds a tf.keras.Model for inputs of shape "
                          f"{tuple(input_shape)} and {num_classes} classes ({spec.name} raised "
                          f"{why(err)})",
                          spec.name) from err
    x = tf.zeros([batch, *input_shape], tf.float32)
    y = tf.zeros([batch], tf.int32)
    try:
        logits = model(x, training=False)
    except Exception as err:
        raise ConfigError(option, f"a model that runs on float32 inputs of shape [batch, "
                          f"{', '.join(str(int(d)) for d in input_shape)}] ({why(err)})",
                          spec.name) from err
    if tuple(logits.shape) != (batch, num_classes):
        raise ConfigError(option, f"a model whose output is [batch, num_classes={num_classes}] "
                          f"logits (it gave shape {list(logits.shape)} for a batch of {batch})",
                          spec.name)
    if not model.trainable_variables:
        raise ConfigError(option, "a model with trainable weights", spec.name)
    parts = [("loss", spec.loss)] + [(f"metrics[{k!r}]", m) for k, m in spec.metrics.items()]
    for what, fn in parts:
        try:
            out = np.asarray(fn(y, logits))
        except Exception as err:
            raise ConfigError(option, f"a {what} (y_true, logits) -> one value per example "
                              f"({why(err)})", spec.name) from err
        if out.shape != (batch,):
            raise ConfigError(option, f"a {what} that returns one value per example, shape "
                              f"[batch] (it returned shape {list(out.shape)} for a batch of "
                              f"{batch}; do not reduce it)", spec.name)
    from fedsim.models.keras import count_parameters

    return count_parameters(model)


def _tf_shares_gpus() -> None:
    """Let TF grow GPU memory in the driver instead of taking it all, before it
    first runs an op (the driver only builds a model to check it)."""
    import tensorflow as tf

    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # TF already initialised in this process
        pass


__all__ = ["ModelSpec", "BuiltinModel", "model_spec", "builtin_spec", "as_spec",
           "check_model", "sparse_categorical_crossentropy", "accuracy"]

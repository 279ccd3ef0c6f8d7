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
import dataclasses
import math
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from fedsim.config import ModelConfig, import_callable, why
from fedsim.data.base import ExampleSpec
from fedsim.errors import ConfigError
from fedsim.tasks.base import Task, metric_name, resolve_loss, resolve_metric, resolve_task
from fedsim.tasks.classification import accuracy, sparse_categorical_crossentropy


@dataclass(frozen=True)
class ModelSpec:
    """A model and how to train and evaluate it (see the module docstring).

    builder: ``(input_shape, num_classes, seed) -> tf.keras.Model`` (logits).
    loss: per-example loss ``(y_true, logits) -> [batch]``; None: the task's
      default (sparse categorical cross-entropy for classification).
    metrics: name -> per-example metric ``(y_true, logits) -> [batch]`` or
      ``(numerator, denominator)`` (:mod:`fedsim.tasks.base`); None: the
      task's defaults (``{"accuracy": accuracy}`` for classification).
    name: what the model is called (default: the builder's name).
    task, example: the task kind and the layout of the data's tensors
      (:class:`fedsim.data.base.ExampleSpec`). A run sets both
      (:meth:`bind`) from its dataset; None means classification of float32
      inputs with int32 labels.

    Everything must pickle (cloudpickle, as Ray sends it to the actors):
    module-level functions, or closures over picklable values.
    """

    builder: Callable[..., Any]
    # None is only an argument (the task's default); a constructed spec holds callables.
    loss: Callable[[Any, Any], Any] = None  # type: ignore[assignment]
    metrics: Mapping[str, Callable[[Any, Any], Any]] = field(
        default=None, hash=False)  # type: ignore[arg-type]
    name: str = ""
    task: Optional[Task] = None
    example: Optional[ExampleSpec] = None
    own_loss: bool = field(default=False, init=False, compare=False)
    own_metrics: bool = field(default=False, init=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.builder):
            raise ConfigError("model", "a builder callable (input_shape, num_classes, seed) "
                              "-> tf.keras.Model", type(self.builder).__name__)
        if self.task is not None:
            object.__setattr__(self, "task", resolve_task(self.task))
        kind = self.task if self.task is not None else resolve_task("classification")
        object.__setattr__(self, "own_loss", self.loss is not None)
        object.__setattr__(self, "own_metrics", self.metrics is not None)
        if self.loss is None:
            object.__setattr__(self, "loss", kind.default_loss())
        if not callable(self.loss):
            raise ConfigError("model.loss", "a callable (y_true, logits) -> per-example "
                              "losses", type(self.loss).__name__)
        if self.metrics is None:
            object.__setattr__(self, "metrics", kind.default_metrics())
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
    def kind(self) -> Task:
        """The task kind (classification when none is bound)."""
        return self.task if self.task is not None else resolve_task("classification")

    @property
    def layout(self) -> ExampleSpec:
        """The data layout the trainers trace for (float32 inputs, int32 labels
        when none is bound; the input shape is then the caller's)."""
        return self.example if self.example is not None else ExampleSpec(())

    def bind(self, task: Any, example: ExampleSpec) -> "ModelSpec":
        """This spec for a dataset's task kind and tensor layout: a loss and
        metrics the spec did not set become the task's defaults."""
        task = resolve_task(task)
        return dataclasses.replace(self, task=task, example=example,
                                   loss=self.loss if self.own_loss else None,  # type: ignore
                                   metrics=self.metrics if self.own_metrics
                                   else None)  # type: ignore[arg-type]

    def batch_sums(self, y_true: Any, logits: Any) -> tuple[Any, dict[str, Any]]:
        """Over a batch (TF ops): ``[numerator sum, denominator sum]`` of the loss,
        and of each metric by name (:func:`fedsim.tasks.base.metric_parts`)."""
        import tensorflow as tf

        from fedsim.tasks.base import metric_parts

        def sums(value: Any) -> Any:
            num, den = metric_parts(value)
            return tf.stack([tf.reduce_sum(num), tf.reduce_sum(den)])

        return sums(self.loss(y_true, logits)), {name: sums(metric(y_true, logits))
                                                 for name, metric in self.metrics.items()}

    def tensor_specs(self, input_shape: Sequence[int]) -> tuple[Any, Any]:
        """``tf.TensorSpec`` of a batch of inputs and of labels (batch axis None)."""
        import tensorflow as tf

        ex = self.layout
        return (tf.TensorSpec([None, *input_shape], ex.input_dtype),
                tf.TensorSpec([None, *ex.label_shape], ex.label_dtype))

    @property
    def is_builtin(self) -> bool:
        """True for fedsim's own logreg, mlp and cnn with the task's default loss."""
        return isinstance(self.builder, BuiltinModel) and not self.own_loss

    def build(self, input_shape: Sequence[int], num_classes: int, seed: int) -> Any:
        """A fresh, built ``tf.keras.Model`` (a subclassed model is called once on a
        zero batch so that its variables exist)."""
        import tensorflow as tf

        model = self.builder(tuple(int(d) for d in input_shape), int(num_classes), int(seed))
        if not isinstance(model, tf.keras.Model):
            raise TypeError(f"the builder returned a {type(model).__name__}, not a "
                            "tf.keras.Model")
        if not model.built:
            model(tf.zeros([1, *input_shape], self.layout.input_dtype), training=False)
        return model

    def initial_weights(self, input_shape: Sequence[int], num_classes: int, seed: int) -> Any:
        """The trainable weights of :meth:`build`'s model as one flat float32
        numpy vector (the order of ``trainable_variables``): a run's ``w_0``."""
        from fedsim.models.keras import FlatWeights

        return FlatWeights(self.build(input_shape, num_classes, seed).trainable_variables
                           ).get().numpy()

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


def model_spec(cfg_model: ModelConfig, model: Any = None, *, task: Any = None,
               example: Optional[ExampleSpec] = None) -> ModelSpec:
    """The ModelSpec a run trains.

    1. ``model`` (from Python: ``run_simulation(cfg, model=...)``), a ModelSpec or a
       builder callable (wrapped with the task's default loss and metrics);
    2. else ``cfg_model.builder`` (``model=keras model.builder=module:callable``),
       imported here: a ModelSpec, or a builder callable;
    3. else the built-in ``cfg_model.name``.

    ``cfg_model.loss`` / ``cfg_model.metrics`` (names, :mod:`fedsim.tasks.base`)
    then replace the spec's loss / metrics, and with ``task`` and ``example``
    (the dataset's) the spec is bound to them (:meth:`ModelSpec.bind`).

    Errors are one-line ConfigErrors naming ``model``, ``model.builder``,
    ``model.loss`` or ``model.metrics``. Imports the builder's module (and
    whatever it imports); TensorFlow itself only to look up Keras loss or
    metric names.
    """
    if model is not None:
        if cfg_model.builder is not None:
            raise ConfigError("model.builder", "null when a model is passed from Python "
                              "(run_simulation's model=): one model per run",
                              cfg_model.builder)
        spec = as_spec(model, "model")
    elif cfg_model.builder is not None:
        obj = _import_callable(cfg_model.builder, "model.builder")
        if isinstance(obj, ModelSpec):
            spec = obj
        elif not callable(obj) or isinstance(obj, types.ModuleType):
            raise ConfigError("model.builder", "a callable (input_shape, num_classes, seed) "
                              f"-> tf.keras.Model, or a ModelSpec (got a {type(obj).__name__})",
                              cfg_model.builder)
        else:
            spec = ModelSpec(obj, name=cfg_model.builder)
    else:
        spec = builtin_spec(cfg_model)
    kind = resolve_task(task) if task is not None else spec.kind
    changes: dict[str, Any] = {}
    if cfg_model.loss is not None:
        with _quiet_tensorflow_start():
            changes["loss"] = resolve_loss(cfg_model.loss, kind)
    if cfg_model.metrics is not None:
        with _quiet_tensorflow_start():
            changes["metrics"] = {metric_name(m): resolve_metric(m, kind)
                                  for m in cfg_model.metrics}
    if changes:
        spec = dataclasses.replace(
            spec, loss=changes.get("loss", spec.loss if spec.own_loss else None),
            metrics=changes.get("metrics", spec.metrics if spec.own_metrics else None))
    if task is not None or example is not None:
        spec = spec.bind(kind, example if example is not None else spec.layout)
    return spec


def check_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int, seed: int,
                option: str = "model", batch: int = 2) -> int:
    """Build ``spec``'s model once and run it, its loss and its metrics on a batch
    of zeros in the spec's tensor layout; returns the parameter count. Refuses,
    with a one-line ConfigError naming ``option``, a builder that fails or does
    not return a Keras model, a model whose output is not the task's
    (:meth:`fedsim.tasks.base.Task.output_shape`, e.g. ``[batch, num_classes]``
    logits), a model without trainable weights, and a loss or metric that is
    not one value (or one numerator and denominator) per example. Imports
    TensorFlow (the driver calls it for users' models only)."""
    import numpy as np

    with _quiet_tensorflow_start():
        import tensorflow as tf
    _tf_shares_gpus()
    ex, task = spec.layout, spec.kind
    try:
        model = spec.build(input_shape, num_classes, seed)
    except Exception as err:
        raise ConfigError(option, f"a builder that builds a tf.keras.Model for inputs of shape "
                          f"{tuple(input_shape)} and {num_classes} classes ({spec.name} raised "
                          f"{why(err)})",
                          spec.name) from err
    x = tf.zeros([batch, *input_shape], ex.input_dtype)
    y = tf.zeros([batch, *ex.label_shape], ex.label_dtype)
    try:
        logits = model(x, training=False)
    except Exception as err:
        raise ConfigError(option, f"a model that runs on {ex.input_dtype} inputs of shape "
                          f"[batch, {', '.join(str(int(d)) for d in input_shape)}] ({why(err)})",
                          spec.name) from err
    want = (batch, *task.output_shape(ex, num_classes))
    if tuple(logits.shape) != want:
        shown = ", ".join(["batch", *(str(d) for d in want[1:])])
        raise ConfigError(option, f"a model whose output for task {task.name} is [{shown}] "
                          f"logits (num_classes={num_classes}; it gave shape "
                          f"{list(logits.shape)} for a batch of {batch})", spec.name)
    if not model.trainable_variables:
        raise ConfigError(option, "a model with trainable weights", spec.name)
    parts = [("loss", spec.loss)] + [(f"metrics[{k!r}]", m) for k, m in spec.metrics.items()]
    for what, fn in parts:
        try:
            out = fn(y, logits)
            if isinstance(out, (tuple, list)) and len(out) == 2:
                shapes = {np.asarray(o).shape for o in out}
                shape = shapes.pop() if len(shapes) == 1 else None
            else:
                shape = np.asarray(out).shape
        except Exception as err:
            raise ConfigError(option, f"a {what} (y_true, logits) -> one value per example "
                              f"({why(err)})", spec.name) from err
        if shape != (batch,):
            raise ConfigError(option, f"a {what} that returns one value per example, shape "
                              f"[batch] (it returned shape {list(shape or ())} for a batch of "
                              f"{batch}; do not reduce it)", spec.name)
    from fedsim.models.keras import count_parameters

    return count_parameters(model)


def sum_batches(batch_sums: Callable[[Any, Any], Any], x: Any, y: Any, batch_size: int
                ) -> tuple[Any, dict[str, Any]]:
    """``batch_sums(x, y)`` (a compiled :meth:`ModelSpec.batch_sums` of a model's
    outputs) added up over ``x, y`` in batches of ``batch_size``: float64
    ``[numerator, denominator]`` of the loss and of each metric."""
    import numpy as np

    loss = np.zeros(2)
    sums: dict[str, Any] = {}
    for s in range(0, len(x), batch_size):
        lb, mb = batch_sums(x[s:s + batch_size], y[s:s + batch_size])
        loss += lb.numpy()
        for name, value in mb.items():
            sums[name] = sums.get(name, np.zeros(2)) + value.numpy()
    return loss, sums


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
           "check_model", "sum_batches", "sparse_categorical_crossentropy", "accuracy",
           "ExampleSpec"]

"""The task-kind protocol, and the per-example losses and metrics it hands out.

A :class:`Task` answers four questions about a model trained on a dataset
(:class:`fedsim.data.base.ExampleSpec` describes the dataset's tensors):

* :meth:`Task.output_shape`: the shape of the model's output for one example
  (``num_classes`` is the dataset's output width: classes, vocabulary size,
  tags, 1);
* :meth:`Task.default_loss`: the per-example loss ``(y_true, logits) -> [batch]``
  the trainers minimise unless the model's spec names another;
* :meth:`Task.default_metrics` and :meth:`Task.named_metric`: per-example
  metrics, reported as ``eval_<name>``;
* :attr:`Task.primary_metric` / :attr:`Task.higher_is_better`: the one number
  the summary, the plot and sweeps lead with.

Metrics are decomposable, so that a mean over a test split, over one client's
test data, or over a federation of clients is well defined: a metric returns,
per example, either one value (its mean over examples is reported) or a pair
``(numerator, denominator)`` (the ratio of the sums is reported: a token
accuracy counts tokens, a precision counts predicted positives, as Keras'
stateful metrics and TFF's baselines do). :func:`metric_parts` reads both.

Losses and metrics may also be named from the config (``model.loss``,
``model.metrics``): a task's own metric names, a Keras loss or metric function
(``tf.keras.losses.get`` / ``tf.keras.metrics.get``; losses on logits, their
non-batch axes averaged), or ``module:callable``. :func:`resolve_loss` and
:func:`resolve_metric` return picklable callables; TensorFlow is imported only
when they run.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from fedsim.config import CALLABLE_PATH, import_callable
from fedsim.errors import ConfigError

if TYPE_CHECKING:
    from fedsim.data.base import ExampleSpec

Metric = Callable[[Any, Any], Any]


class Task(ABC):
    """A task kind (subclass it for your own; instances must pickle).

    name: how summaries and errors call it. primary_metric: the metric the
    summary reports as the run's result (``final``/``best``), which
    :meth:`default_metrics` must contain. higher_is_better: its direction.
    """

    name: str = "task"
    primary_metric: str = "accuracy"
    higher_is_better: bool = True

    @abstractmethod
    def output_shape(self, example: "ExampleSpec", num_classes: int) -> tuple[int, ...]:
        """The model's output shape for ONE example (no batch axis)."""

    @abstractmethod
    def default_loss(self) -> Metric:
        """The per-example loss ``(y_true, logits) -> [batch]`` used by default."""

    @abstractmethod
    def default_metrics(self) -> dict[str, Metric]:
        """name -> per-example metric, reported unless the spec names others."""

    def named_metric(self, name: str) -> Metric | None:
        """This task's metric called ``name`` (e.g. for ``model.metrics=[...]``), or
        None if it has none of that name."""
        return self.default_metrics().get(name)

    def check_example(self, example: "ExampleSpec") -> str | None:
        """Why this task cannot train on tensors like ``example`` (None: it can)."""
        return None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.name}({args})" if args else self.name


def metric_parts(value: Any) -> tuple[Any, Any]:
    """A metric's per-example output as ``(numerator, denominator)`` float32
    ``[batch]`` tensors: a pair as given, a single value over a denominator of 1."""
    import tensorflow as tf

    if isinstance(value, (tuple, list)):
        num, den = value
        return tf.cast(num, tf.float32), tf.cast(den, tf.float32)
    num = tf.cast(value, tf.float32)
    return num, tf.ones_like(num)


def per_example(values: Any) -> Any:
    """Average every axis but the first: ``[batch, ...] -> [batch]``."""
    import tensorflow as tf

    values = tf.convert_to_tensor(values)
    if values.shape.rank is not None and values.shape.rank > 1:
        return tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values


@dataclass(frozen=True)
class KerasLoss:
    """A Keras loss function by name (``tf.keras.losses.get``), on logits
    (``from_logits=True`` where the function takes it), per example: the axes
    Keras does not reduce (e.g. sequence positions) are averaged."""

    name: str

    def __call__(self, y_true: Any, logits: Any) -> Any:
        import tensorflow as tf

        fn = tf.keras.losses.get(self.name)
        if isinstance(fn, tf.keras.losses.Loss):  # a class name: its function
            fn = getattr(fn, "fn", fn)
        kwargs = ({"from_logits": True}
                  if "from_logits" in inspect.signature(fn).parameters else {})
        return per_example(fn(y_true, logits, **kwargs))


@dataclass(frozen=True)
class KerasMetric:
    """A Keras metric *function* by name (``tf.keras.metrics.get``, e.g.
    ``sparse_top_k_categorical_accuracy``, ``mean_absolute_error``), per example."""

    name: str

    def __call__(self, y_true: Any, logits: Any) -> Any:
        import tensorflow as tf

        return per_example(tf.keras.metrics.get(self.name)(y_true, logits))


def _keras_has(kind: str, name: str) -> bool:
    """Whether Keras knows a loss / metric FUNCTION of that name (imports TF)."""
    import tensorflow as tf

    try:
        obj = (tf.keras.losses if kind == "loss" else tf.keras.metrics).get(name)
    except (ValueError, TypeError):
        return False
    if kind == "metric" and (isinstance(obj, type) or isinstance(obj, tf.keras.metrics.Metric)):
        return False  # a stateful metric: not per example
    return callable(obj)


def _named_callable(name: str, option: str, what: str) -> Metric:
    """The callable ``module:callable`` names; a one-line ConfigError if it is not one."""
    fn = import_callable(name, option)
    if not callable(fn):
        raise ConfigError(option, f"module:callable naming a per-example {what}", name)
    return fn


def resolve_loss(name: str, task: Task, option: str = "model.loss") -> Metric:
    """The per-example loss ``name`` names: ``module:callable``, or a Keras loss
    function's name. One-line ConfigError naming ``option`` otherwise."""
    if CALLABLE_PATH.fullmatch(name):
        return _named_callable(name, option, "loss (y_true, logits) -> [batch]")
    if not _keras_has("loss", name):
        raise ConfigError(option, "a Keras loss function's name (e.g. "
                          "sparse_categorical_crossentropy, binary_crossentropy, "
                          "mean_squared_error) or module:callable", name)
    return KerasLoss(name)


def resolve_metric(name: str, task: Task, option: str = "model.metrics") -> Metric:
    """The per-example metric ``name`` names: one of ``task``'s own metrics,
    ``module:callable``, or a Keras metric function's name (Keras' stateful
    metric classes are refused: they are not per example)."""
    own = task.named_metric(name)
    if own is not None:
        return own
    if CALLABLE_PATH.fullmatch(name):
        return _named_callable(name, option, "metric (y_true, logits) -> [batch] or "
                               "(numerator, denominator)")
    if not _keras_has("metric", name):
        own_names = ", ".join(task.default_metrics())
        raise ConfigError(option, f"a metric of task {task.name} ({own_names}), a Keras "
                          "metric function's name (e.g. sparse_top_k_categorical_accuracy) "
                          "or module:callable", name)
    return KerasMetric(name)


def metric_name(name: str) -> str:
    """The key a configured metric is reported under: its name, or the callable's
    name for ``module:callable``."""
    return name.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if ":" in name else name


def resolve_task(task: Any) -> Task:
    """A Task as given, or one of the built-in kinds by name."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        if task in TASKS:
            module, cls = TASKS[task]
            return getattr(importlib.import_module(module), cls)()
        if CALLABLE_PATH.fullmatch(task):
            obj = import_callable(task, "data.task")
            obj = obj() if isinstance(obj, type) else obj
            if isinstance(obj, Task):
                return obj
    raise ConfigError("data.task", "one of " + ", ".join(TASKS) + ", a fedsim.tasks.base.Task "
                      "or module:callable naming one", task)


#: The built-in task kinds (name -> (module, class)); each has defaults for
#: every constructor argument.
TASKS: Mapping[str, tuple[str, str]] = {
    "classification": ("fedsim.tasks.classification", "Classification"),
    "next_token": ("fedsim.tasks.next_token", "NextTokenPrediction"),
    "multilabel": ("fedsim.tasks.multilabel", "MultiLabel"),
    "binary": ("fedsim.tasks.binary", "Binary"),
    "regression": ("fedsim.tasks.regression", "Regression"),
}

__all__ = ["Task", "TASKS", "metric_parts", "per_example", "resolve_loss", "resolve_metric",
           "resolve_task", "metric_name", "KerasLoss", "KerasMetric"]

"""TensorFlow Federated aggregation factories as fedsim aggregators.

``aggregator=tff`` runs a real ``tff.aggregators.UnweightedAggregationFactory`` or
``WeightedAggregationFactory`` in the server actor::

 aggregator.kind: tff
 aggregator.factory: tensorflow_federated.aggregators:DifferentiallyPrivateFactory.gaussian_adaptive
 aggregator.args: {noise_multiplier: 0.5, clients_per_round: 10}

``factory`` is ``module:attr.path``; the attribute is called with ``args`` (ints
are passed as floats where the callable's annotations ask for a float, since
TFF's DP factories refuse ``0`` for ``0.0``); a factory *instance* is used as is.

How it maps onto fedsim's aggregation protocol (:mod:`fedsim.aggregation.base`):

- A TFF ``AggregationProcess`` clips, sums, noises... the *individual* client
  values itself, so the workers cannot pre-sum. :meth:`TFFAggregator.accumulate`
  stacks: a worker's :class:`~fedsim.aggregation.base.Partial` carries its clients'
  updates as ``total``, a float32 ``(k, d)`` array, and their weights as
  ``extras[0]`` (``(k,)`` float64); :meth:`~TFFAggregator.merge` concatenates. So a
  worker sends k vectors per round instead of one partial sum, and the server
  holds the whole cohort's updates (``clients_per_round * d * 4`` bytes) at once.
  (Aggregators are pure, so each ``accumulate`` copies the stack: quadratic in
  the clients per worker, about 26 ms for 100 clients of 55k parameters.)
- Workers only build the aggregator and stack updates: constructing a
  :class:`TFFAggregator`, ``zero_partial``, ``accumulate`` and ``merge`` use
  numpy only and never import TensorFlow or TFF.
- In the server actor the factory is resolved in :meth:`~TFFAggregator.initial_state`
  (so a bad ``aggregator.factory`` fails when the server starts) and the process
  is created on the first :meth:`~TFFAggregator.finalize`, for the value type
  ``float32[d]`` (fedsim's weights are one flat vector; TFF's DP clipping uses
  the global L2 norm over the whole structure, so flat and per-layer values are
  clipped identically -- tested).
- ``finalize`` calls ``process.next(state, values)`` (weighted factories get
  ``weights``: each client's ``num_examples``, or 1.0 with
  ``server.weighting=uniform``) and returns the aggregate as a float32 vector,
  the new state, and the process's measurements flattened to scalar floats under
  ``tff/...`` keys (e.g. ``tff/dp_query_metrics/clip``: the clip for the *next*
  round). A DpEvent the process reports (``DifferentiallyPrivateFactory``
  keeps it in its state, ``DPAggregatorState.dp_event``; a custom factory may
  put one in its measurements) is returned as ``measurements["dp_event"]``, a
  ``dp_accounting.DpEvent`` with Python numbers.
- State: ``{"tff": TFFState | None}``; None until the first round. A
  :class:`TFFState` holds the process state's leaves (numpy arrays, Python
  numbers, bytes), which checkpoints store without pickle (a ``TFFState`` is in
  :data:`fedsim.results.checkpoint.RECORDS`); the structure is rebuilt from
  ``process.initialize()``.
- ``num_sampled`` is not used: TFF's factories carry their own denominators
  (``clients_per_round``). ``rng`` is not used either: the process runs in TFF's
  C++ runtime (a ``worker_binary`` child process), where TF Privacy's noise ops
  are unseeded (TFF traces them into a fresh ``tf.Graph`` without a graph seed),
  so seeding TensorFlow's RNG has no effect (and their noise is TF's float32
  sampler, not :mod:`fedsim.privacy.noise`).
  Noisy TFF rounds are therefore not reproducible; noise-free ones are
  deterministic. A factory that keeps its noise seed in its state (e.g.
  ``examples/laplace_factory.py``, or TFF's ``tree_aggregation(noise_seed=...)``)
  is reproducible, also across checkpoint and resume.
- Computations run in TFF's *test* C++ execution context
  (``tff.backends.test``), installed only around fedsim's calls: it is the
  native runtime plus the rewriting of ``federated_secure_sum*`` into plain sums
  (TFF's simulation of secure aggregation), so ``SecureSumFactory`` and friends
  work. The context starts a ``worker_binary`` process that outlives Python and
  keeps stdout open: call :meth:`TFFAggregator.close` (or
  :func:`stop_tff_worker_binaries`) when done. A small watchdog process also
  stops it if the Python process dies without closing (a killed actor).
- No ``current_clip``: the clip, if any, lives inside the TFF state, so the
  canary audit needs ``audit.canary_norm`` with this aggregator, and fedsim's
  secure aggregation is refused (:func:`build_tff_aggregator`).
- Updates are passed as they are: TFF's factories do not zero non-finite updates
  unless wrapped (``tff.aggregators.zeroing_factory``); an aggregate that is not
  finite is replaced by zeros and counted as ``tff_nonfinite``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from fedsim.aggregation.base import Aggregator, Partial
from fedsim.errors import ConfigError

WORKER_BINARY = "worker_binary"

_WATCHDOGS: list[subprocess.Popen] = []
_GUARDED: set[int] = set()

# Runs in a tiny separate Python process: when its parent (the process that owns
# TFF's worker_binary) is gone, it terminates the worker_binary.
_WATCHDOG_CODE = """
import os, signal, sys, time
parent, child = int(sys.argv[1]), int(sys.argv[2])
while True:
    time.sleep(0.5)
    try:
        os.kill(child, 0)
    except OSError:
        break
    if os.getppid() != parent:
        try:
            os.kill(child, signal.SIGTERM)
        except OSError:
            pass
        break
"""


# ----------------------------------------------------------------------------- processes


def _worker_binaries(recursive: bool = True) -> list[Any]:
    """Live (not zombie) worker_binary processes among this process's descendants."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=recursive):
        try:
            if child.name() == WORKER_BINARY and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.Error:
            pass
    return out


def stop_tff_worker_binaries(timeout: float = 10.0, pids: Optional[set[int]] = None) -> int:
    """Terminate the TFF ``worker_binary`` processes among this process's descendants.

    Returns how many were stopped (in a Ray driver this includes those of its
    local actors, which are its descendants). They are the C++ runtimes of TFF's execution
    contexts: they outlive Python and keep its stdout open. Those that do not
    exit within ``timeout`` seconds are killed. A later TFF computation starts a
    fresh one (TFF restarts its service when it finds it down). ``pids``: stop
    only these.
    """
    import psutil

    procs = [p for p in _worker_binaries() if pids is None or p.pid in pids]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    # Poll without reaping (TFF's own Popen reaps its child later; until then a
    # dead child is a zombie), then kill what is left.
    deadline = time.monotonic() + timeout
    remaining = [p for p in procs if _alive(p)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [p for p in remaining if _alive(p)]
    for p in remaining:
        try:
            p.kill()
        except psutil.Error:
            pass
    for w in list(_WATCHDOGS):
        args: Any = w.args
        if pids is not None and int(args[-1]) not in pids:
            continue
        if w.poll() is None:
            w.terminate()
        try:
            w.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            w.kill()
        _WATCHDOGS.remove(w)
        _GUARDED.discard(int(args[-1]))
    return len(procs)


def _alive(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _guard_worker_binaries() -> None:
    """Start a watchdog for each new worker_binary child (stops it if we die)."""
    for p in _worker_binaries(recursive=False):
        if p.pid in _GUARDED:
            continue
        _GUARDED.add(p.pid)
        # close_fds=False lets Python use posix_spawn (no fork, so gRPC's fork
        # handlers stay quiet); our descriptors are non-inheritable anyway.
        _WATCHDOGS.append(subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG_CODE, str(os.getpid()), str(p.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False))


# ----------------------------------------------------------------------------- factory


def _float_params(fn: Callable) -> set[str]:
    """Parameters of ``fn`` annotated ``float`` or ``Optional[float]``."""
    try:
        target = fn.__init__ if inspect.isclass(fn) else fn
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: coerce nothing
        return set()
    out = set()
    for name, hint in hints.items():
        args = typing.get_args(hint)
        if hint is float or (float in args and all(a in (float, type(None)) for a in args)):
            out.add(name)
    return out


def _import(module_name: str, spec: str) -> Any:
    """Import ``module_name``; a dotted tail that is an attribute rather than a
    module (``tensorflow_federated.aggregators`` is ``tff.aggregators``) is
    looked up on the longest importable prefix."""
    parts = module_name.split(".")
    first_error: Optional[BaseException] = None
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(prefix)
        except ModuleNotFoundError as err:
            if err.name is None or not prefix.startswith(err.name):
                first_error = first_error or err  # a dependency is missing: report it
                break
            first_error = first_error or err
            continue
        except Exception as err:
            raise ConfigError("aggregator.factory", f"an importable module before ':' "
                              f"(importing {prefix!r} failed: {type(err).__name__}: {err})",
                              spec) from err
        for part in parts[i:]:
            if not hasattr(obj, part):
                break
            obj = getattr(obj, part)
        else:
            return obj
        break
    raise ConfigError("aggregator.factory", f"an importable module before ':' (importing "
                      f"{module_name!r} failed: {type(first_error).__name__}: {first_error})",
                      spec) from first_error


def resolve_factory(spec: str, args: Optional[Mapping[str, Any]] = None) -> Any:
    """The TFF aggregation factory that ``spec`` (``module:attr.path``) names.

    A callable attribute is called with ``args``; ints are passed as floats for
    parameters annotated ``float``. Raises :class:`ConfigError` (naming
    ``aggregator.factory`` or ``aggregator.args``) when the module cannot be
    imported, the attribute does not exist, the call fails, or the result is not
    a ``tff.aggregators.UnweightedAggregationFactory`` or
    ``WeightedAggregationFactory``. Imports TFF.
    """
    args = dict(args or {})
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ConfigError("aggregator.factory", "module:attr.path naming a TFF aggregation "
                          "factory (e.g. tensorflow_federated.aggregators:MeanFactory)", spec)
    module_name, attr_path = spec.split(":")
    obj = _import(module_name, spec)
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError("aggregator.factory", f"an attribute path that exists ({part!r} "
                              f"not found in {getattr(obj, '__name__', obj)!r})", spec)
        obj = getattr(obj, part)
    import tensorflow_federated as tff

    kinds = (tff.aggregators.UnweightedAggregationFactory,
             tff.aggregators.WeightedAggregationFactory)
    if isinstance(obj, kinds):
        if args:
            raise ConfigError("aggregator.args", f"empty: {spec} is a factory instance, not "
                              "a callable", args)
        return obj
    if not callable(obj):
        raise ConfigError("aggregator.factory", "a callable returning a "
                          "tff.aggregators.UnweightedAggregationFactory or "
                          f"WeightedAggregationFactory (got a {type(obj).__name__})", spec)
    floats = _float_params(obj)
    call_args = {k: float(v) if k in floats and isinstance(v, int) and not isinstance(v, bool)
                 else v for k, v in args.items()}
    try:
        factory = obj(**call_args)
    except Exception as err:
        raise ConfigError("aggregator.args", f"keyword arguments that {spec} accepts "
                          f"({type(err).__name__}: {err})", args) from err
    if not isinstance(factory, kinds):
        raise ConfigError("aggregator.factory", "a callable returning a "
                          "tff.aggregators.UnweightedAggregationFactory or "
                          f"WeightedAggregationFactory (it returned a "
                          f"{type(factory).__module__}.{type(factory).__name__})", spec)
    return factory


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True, eq=False)
class TFFState:
    """A TFF process state in plain form (what checkpoints can store).

    size: the value dimension d the process was created for. leaves: the
    state's leaves in ``tf.nest`` order (numpy arrays, Python numbers, bytes);
    the structure comes from the process's ``initialize()``.
    """

    size: int
    leaves: tuple


def _plain(leaf: Any) -> Any:
    if isinstance(leaf, np.ndarray):
        return leaf.copy()
    if isinstance(leaf, np.generic):
        return leaf.item()
    return leaf


def _is_event(node: Any) -> bool:
    fields = getattr(node, "_fields", None) or ()
    return "module_name" in fields and "class_name" in fields


def _find_events(node: Any) -> list[Any]:
    """DpEvent named tuples in a TFF result (not the placeholder of an init state)."""
    if _is_event(node):
        return [node]
    if hasattr(node, "_fields"):
        if "is_init_state" in node._fields and bool(np.asarray(node.is_init_state)):
            return []
        children = list(node)
    elif isinstance(node, Mapping):
        children = list(node.values())
    elif isinstance(node, (list, tuple)):
        children = list(node)
    else:
        return []
    return [e for c in children for e in _find_events(c)]


def _scalars(node: Any, prefix: str, out: dict[str, float]) -> None:
    """Flatten measurements to ``{prefix/path: float}`` (size-1 numeric leaves)."""
    if _is_event(node):
        return
    if hasattr(node, "_fields"):
        items = list(zip(node._fields, node))
    elif isinstance(node, Mapping):
        items = list(node.items())
    elif isinstance(node, (list, tuple)):
        items = list(enumerate(node))
    else:
        arr = np.asarray(node)
        if arr.size == 1 and (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            out[prefix] = float(arr.reshape(()))
        return
    for k, v in items:
        _scalars(v, f"{prefix}/{k}", out)


# ----------------------------------------------------------------------------- aggregator


class TFFAggregator(Aggregator):
    """fedsim's aggregation protocol over a TFF aggregation factory (module docstring).

    factory: ``module:attr.path``; args: its keyword arguments; weighting:
    ``num_examples`` or ``uniform``, the weights a weighted factory gets.
    Constructing one is cheap and imports neither TensorFlow nor TFF. Its
    records are not summed under secure aggregation (wrap the factory in TFF's
    own ``SecureSumFactory`` instead).
    """

    supports_secure_sum = False

    def __init__(self, factory: str, args: Optional[Mapping[str, Any]] = None,
                 weighting: str = "num_examples") -> None:
        if weighting not in ("num_examples", "uniform"):
            raise ValueError(f"weighting must be num_examples or uniform, got {weighting!r}")
        self.factory_spec = factory
        self.args = dict(args or {})
        self.weighting = weighting
        self._factory: Any = None
        self._process: Any = None
        self._size: Optional[int] = None
        self._weighted = False
        self._template: Any = None
        self._context: Any = None
        self._pids: set[int] = set()

    # -- server side: the TFF objects, built lazily ----------------------------------
    @property
    def factory(self) -> Any:
        """The resolved TFF factory (imports TFF on first use)."""
        if self._factory is None:
            self._factory = resolve_factory(self.factory_spec, self.args)
        return self._factory

    def _run(self, fn: Callable, *args: Any) -> Any:
        import tensorflow_federated as tff

        before = None
        if self._context is None:
            self._context = tff.backends.test.create_sync_test_cpp_execution_context()
            before = {p.pid for p in _worker_binaries(recursive=False)}
        with tff.framework.get_context_stack().install(self._context):
            out = fn(*args)
        if before is not None:  # the context's worker_binary starts with its first call
            self._pids |= {p.pid for p in _worker_binaries(recursive=False)} - before
        _guard_worker_binaries()
        return out

    def process(self, size: int) -> Any:
        """The ``AggregationProcess`` for float32 values of dimension ``size``."""
        if self._process is not None and self._size == size:
            return self._process
        import tensorflow_federated as tff

        factory = self.factory
        value_type = tff.TensorType(np.float32, [int(size)])
        self._weighted = isinstance(factory, tff.aggregators.WeightedAggregationFactory)
        try:
            if self._weighted:
                proc = factory.create(value_type, tff.TensorType(np.float32))
            else:
                proc = factory.create(value_type)
        except Exception as err:
            raise ConfigError("aggregator.factory", f"a factory that can aggregate float32[{size}] "
                              f"values ({type(err).__name__}: {err})",
                              self.factory_spec) from err
        self._process, self._size = proc, int(size)
        self._template = self._run(proc.initialize)
        return proc

    def _tff_state(self, state: Optional[TFFState], size: int) -> Any:
        import tensorflow as tf

        self.process(size)
        if state is None:
            return self._template
        if state.size != size:
            raise ValueError(f"aggregator state is for values of size {state.size}, not {size}")
        return tf.nest.pack_sequence_as(self._template, list(state.leaves))

    def close(self) -> None:
        """Stop this process's TFF worker_binaries; the process is rebuilt if used again.

        The binaries are terminated first (SIGTERM): TFF's own service manager,
        collected with the dropped context, sends SIGINT and waits for its child
        without a timeout, and a binary started from a process that ignores
        SIGINT (a background job of a non-interactive shell; the disposition is
        inherited) would never exit. Then the context is dropped (TFF reaps its
        dead child) and what is left is terminated too."""
        import gc

        stop_tff_worker_binaries()
        self._process = self._template = self._context = None
        self._size = None
        gc.collect()
        # All of this process's worker_binaries: leaving the test context can make
        # TFF's default context start one of its own.
        stop_tff_worker_binaries()
        self._pids = set()
        # TFF may restart a binary it finds dead while its context lingers: guard
        # any such one too, so that it dies with this process.
        _guard_worker_binaries()

    # -- the protocol -------------------------------------------------------------------
    def initial_state(self) -> dict[str, Any]:
        """``{"tff": None}``: the process is created for the model's size in the
        first ``finalize``. Resolves the factory now, so a bad one fails early."""
        _ = self.factory
        return {"tff": None}

    def client_params(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def zero_partial(self, size: int) -> Partial:
        return Partial(np.zeros((0, int(size)), np.float32), 0.0, 0, {},
                       (np.zeros(0, np.float64),))

    def record(self, params: Mapping[str, Any], delta: np.ndarray,
               num_examples: float) -> Partial:
        """One client's update as a one-row stack, with its weight."""
        w = float(num_examples) if self.weighting == "num_examples" else 1.0
        return Partial(np.asarray(delta, np.float32).reshape(1, -1), w, 1, {},
                       (np.array([w], np.float64),))

    def accumulate(self, params: Mapping[str, Any], partial: Partial, delta: np.ndarray,
                   num_examples: float) -> Partial:
        """Append one client's update (a row) and weight; nothing is summed."""
        return self.merge(partial, self.record(params, delta, num_examples))

    def merge(self, a: Partial, b: Partial) -> Partial:
        """Concatenate two stacks of client updates (and add their counts)."""
        stats = dict(a.stats)
        for k, v in b.stats.items():
            stats[k] = stats.get(k, 0.0) + v
        return Partial(np.concatenate([a.total, b.total], axis=0), a.weight + b.weight,
                       a.count + b.count, stats,
                       (np.concatenate([a.extras[0], b.extras[0]]),))

    def finalize(self, state: Mapping[str, Any], partial: Partial, num_sampled: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        """One ``process.next`` over the stacked client values (see module docstring)."""
        total = np.asarray(partial.total, np.float32)
        size = int(total.shape[-1])
        proc = self.process(size)
        tff_state = self._tff_state(state.get("tff"), size)
        values = [row for row in total.reshape(-1, size)]
        if self._weighted:
            weights = [np.float32(w) for w in partial.extras[0]]
            out = self._run(proc.next, tff_state, values, weights)
        else:
            out = self._run(proc.next, tff_state, values)
        result = np.asarray(out.result, np.float32).reshape(-1)
        if result.size != size:
            raise ValueError(f"the TFF process returned {result.size} values, expected {size}")
        measurements: dict[str, Any] = {}
        _scalars(out.measurements, "tff", measurements)
        finite = bool(np.isfinite(result).all())
        if not finite:
            result = np.zeros(size, np.float32)
        measurements["tff_nonfinite"] = int(not finite)
        events = _find_events(out.state) + _find_events(out.measurements)
        if events:
            measurements["dp_event"] = self._event(events)
        import tensorflow as tf

        leaves = tuple(_plain(v) for v in tf.nest.flatten(out.state))
        return result, {"tff": TFFState(size, leaves)}, measurements

    @staticmethod
    def _event(named: list[Any]) -> Any:
        import dp_accounting

        from fedsim.privacy.queries import python_event

        events = [python_event(dp_accounting.DpEvent.from_named_tuple(e)) for e in named]
        return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def build_tff_aggregator(cfg: Any) -> TFFAggregator:
    """The aggregator for ``cfg.aggregator.kind == "tff"`` (cheap: no TFF import).

    Refuses secure aggregation: fedsim's SecAgg sums the updates inside the
    protocol, but a TFF process needs them one by one (TFF's own secure sums run
    as plain sums in its test context; use ``SecureSumFactory`` for that)."""
    # SimConfig refuses secure aggregation with a TFF factory (see _check_tff).
    return TFFAggregator(cfg.aggregator.factory, cfg.aggregator.args, cfg.server.weighting)

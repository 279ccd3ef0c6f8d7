"""The package layout: fedsim's import graph has no cycles, and the driver's
side (config, accounting, mechanism specs) imports without TensorFlow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedsim"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the fedsim modules it imports, anywhere in its body (function-level
    imports count: they are cycles that only show at run time)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from fedsim.privacy import noise` imports the module fedsim.privacy.noise
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 30 and graph["fedsim.simulation"]  # the graph was really read
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_driver_side_imports_without_tensorflow():
    """What the driver needs to check a config and account for privacy never
    starts TensorFlow (8 s and a GiB per process), nor imports MLflow (only a
    tracked run does)."""
    code = ("import sys; import fedsim.config, fedsim.privacy.accounting, fedsim.cli, "
            "fedsim.privacy.mechanisms.base, fedsim.privacy.mechanisms.gaussian, "
            "fedsim.privacy.mechanisms.gaussian_adaptive, fedsim.privacy.mechanisms.laplace, "
            "fedsim.privacy.mechanisms.distributed_skellam, fedsim.privacy.mechanisms.none, "
            "fedsim.results.checkpoint, fedsim.models.spec, fedsim.simulation, "
            "fedsim.results.tracking, fedsim.privacy.tuning; "
            "print(sorted(m for m in ('tensorflow', 'tensorflow_privacy', 'tensorflow_federated', "
            "'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_plain_runs_actors_start_without_jax_dp_accounting_or_scipy_stats():
    """A server and a worker for the quick start's run (dp=none, FedAvg), built in
    a fresh process from the pickled parts Ray would send. The server, given
    w_0, imports no TensorFlow (also through a checkpoint's get/set_state); the
    worker builds the same w_0 and evaluates like the server would in process.
    The worker imports TensorFlow but not what it never uses: JAX and pandas (TF Lite's converter and Keras's
    data adapter import them: skipped by
    fedsim.engine.worker.import_tensorflow), dp-accounting (SciPy's signal
    processing) and SciPy's statistics (the canary audit): seconds of every
    actor's start. The import still works where it is needed (checked last)."""
    import pickle

    from fedsim.algorithms.base import resolve_algorithm
    from fedsim.config import SimConfig
    from fedsim.data.loaders import load_federated_data
    from fedsim.engine.parts import Parts
    from fedsim.models.spec import model_spec
    from fedsim.privacy.mechanisms.base import resolve_mechanism

    cfg = SimConfig(clients=10, clients_per_round=2, rounds=1, progress=False)
    data = load_federated_data(cfg.data, cfg.clients, cfg.seed)
    parts = Parts(model_spec(cfg.model, None, task=data.task, example=data.example),
                  resolve_mechanism("none"), resolve_algorithm("fedavg", cfg))
    w0 = parts.model.initial_weights(data.input_shape, data.num_classes, cfg.seed)
    blob = pickle.dumps((cfg, parts, data.train, data.input_shape, data.num_classes,
                         data.x_test, data.y_test, w0))
    child = (
        "import pickle, sys\n"
        "import numpy as np\n"
        "cfg, parts, train, shape, k, x, y, w0 = pickle.loads(sys.stdin.buffer.read())\n"
        "from fedsim.engine.server import Server\n"
        "from fedsim.engine.worker import ClientWorker\n"
        "server = Server(cfg, parts, shape, k, x, y, 1.0, w0)\n"
        "server.set_state(server.get_state())\n"
        "print('tensorflow' in sys.modules, server.num_parameters() == w0.size)\n"
        "worker = ClientWorker(cfg, parts, train, shape, k, 1.0, 0)\n"
        "print(np.array_equal(worker.initial_weights(), w0),\n"
        "      worker.evaluate_central(w0, x, y) == Server(cfg, parts, shape, k, x, y,\n"
        "                                                    1.0, w0).evaluate())\n"
        "print(sorted(m for m in ('jax', 'pandas', 'dp_accounting', 'scipy.signal',\n"
        "                         'scipy.stats', 'tensorflow_privacy', 'tensorflow_federated')\n"
        "             if m in sys.modules), 'tensorflow' in sys.modules)\n"
        "import jax, dp_accounting, pandas\n"
        "print(jax.numpy.zeros(2).shape, dp_accounting.NoOpDpEvent(), pandas.Series([1]).size)\n")
    out = subprocess.run([sys.executable, "-c", child], input=blob, capture_output=True,
                         check=True, cwd=PACKAGE.parent)
    assert out.stdout.decode().splitlines() == ["False True", "True True", "[] True",
                                                "(2,) NoOpDpEvent() 1"]

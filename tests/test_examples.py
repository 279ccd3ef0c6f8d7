"""The examples of plugging in your own parts run, in process, and do what they say:
examples/custom_model.py (a user's Keras model) and examples/custom_data.py (a
user's ClientData); and a user's builder through Hydra and the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, SCRIPT

if str(ROOT) not in sys.path:  # `examples` is imported from the repository root
    sys.path.insert(0, str(ROOT))


def _count(builder, input_shape, num_classes=10, seed=0) -> int:
    from fedsim.models.keras import count_parameters

    return count_parameters(builder(input_shape, num_classes, seed))


def _finite(rows, keys):
    return all(r[k] is not None and math.isfinite(r[k]) for r in rows for k in keys)


def test_custom_model_example(warm_actors, tmp_path, capsys):
    from examples import custom_model

    result = custom_model.main(str(tmp_path / "run"), actors=warm_actors)
    assert result.summary["num_parameters"] == _count(custom_model.build, (8, 8, 1))
    assert result.weights.size == result.summary["num_parameters"]
    rows = result.metrics
    assert [r["round"] for r in rows] == [1, 2]
    assert _finite(rows, ("train_loss", "eval_loss", "eval_accuracy", "eval_top2_accuracy"))
    for r in rows:  # the spec's own metric, next to accuracy
        assert 0 <= r["eval_accuracy"] <= r["eval_top2_accuracy"] <= 1
    assert rows[-1]["eval_accuracy"] > 0.2  # it learns (chance: 0.1)
    assert result.summary["final"]["eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert "custom_model: residual_cnn" in capsys.readouterr().out
    assert (tmp_path / "run" / "summary.json").exists()


def test_custom_data_example(warm_actors, capsys):
    from examples import custom_data

    data = custom_data.make_data(num_clients=20)
    labels = [set(data.train.client(c)[1].tolist()) for c in range(data.train.num_clients)]
    assert max(map(len, labels)) <= 4 and np.mean([len(s) for s in labels]) < 3  # label skew
    result = custom_data.main(actors=warm_actors)
    s = result.summary
    assert s["config"]["clients"] == data.train.num_clients == 20
    assert s["data"] == {"name": "label_skew_gaussians", "num_classes": 10,
                         "input_shape": [16], "test_examples": 500}
    assert s["num_parameters"] == 16 * 32 + 32 + 32 * 10 + 10
    assert [r["clients"] for r in result.metrics] == [5, 5]
    assert _finite(result.metrics, ("train_loss", "eval_loss", "eval_accuracy"))
    assert result.metrics[-1]["eval_accuracy"] > 0.2  # above chance (0.1) after 2 rounds
    assert "custom_data: label_skew_gaussians, 20 clients, 500 test examples" in (
        capsys.readouterr().out)


def test_builder_from_hydra_composes_and_runs(warm_actors):
    from test_golden import SMALL, compose

    from examples import custom_model
    from fedsim.simulation import run_simulation

    overrides = [o for o in SMALL if not o.startswith("model=")]
    cfg = compose(overrides + ["model=keras", "model.builder=examples.custom_model:build"])
    assert (cfg.model.name, cfg.model.builder) == ("keras", "examples.custom_model:build")
    result = run_simulation(cfg, actors=warm_actors)
    assert result.summary["num_parameters"] == _count(custom_model.build, (8, 8, 1))
    assert result.summary["config"]["model"]["builder"] == "examples.custom_model:build"
    assert _finite(result.metrics, ("train_loss", "eval_loss", "eval_accuracy"))
    # A ModelSpec by name brings its own metrics.
    spec_cfg = compose(overrides + ["rounds=1", "model=keras",
                                    "model.builder=examples.custom_model:MODEL"])
    assert "eval_top2_accuracy" in run_simulation(spec_cfg, actors=warm_actors).metrics[-1]


def _simulate(*args: str, cwd) -> subprocess.CompletedProcess:
    """scripts/simulate.py as a user runs it, with the repository root on PYTHONPATH."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=path)
    return subprocess.run([sys.executable, str(SCRIPT), *args, "rounds=1", "ray.workers=1",
                           f"hydra.run.dir={cwd / 'run'}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


BAD_BUILDERS = [
    (["model=keras"], "model.builder=None: allowed is module:callable naming your model's builder"),
    (["model=keras", "model.builder=examples.no_such_module:build"],
     "model.builder=examples.no_such_module:build: allowed is an importable module before ':'"),
    (["model=keras", "model.builder=examples.custom_model:no_such_builder"],
     "'no_such_builder' not found in 'examples.custom_model'"),
    (["model=keras", "model.builder=examples.custom_model"],
     "model.builder=examples.custom_model: allowed is module:callable"),
    (["model=mlp", "model.builder=examples.custom_model:build"],
     "allowed is null with model.name=mlp"),
    (["model=keras", "model.builder=examples.custom_model:build", "client.vectorize=4"],
     "client.vectorize=4: allowed is 0 or 1 with model examples.custom_model:build "
     "(vectorized training: layer Add"),
]


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
@pytest.mark.parametrize("args,message", BAD_BUILDERS, ids=[" ".join(a) for a, _ in BAD_BUILDERS])
def test_bad_builder_through_the_cli_is_one_line_exit_2(tmp_path, args, message):
    proc = _simulate(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("fedsim: error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

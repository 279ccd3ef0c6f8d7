"""Every conf/task preset end to end for a round, composed as the CLI composes it,
on tiny files in the datasets' real schemas (TFF's SqlClientData sqlite, the
StackOverflow vocabulary files)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedsim.simulation import run_simulation
from tests.test_datasets_text import POSTS, ROLES, TAGS, WORDS, write_sql
from tests.test_golden import compose


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    write_sql(root / "shakespeare" / "shakespeare.sqlite",
              [(split, role, {"snippets": s}) for (role, split), snippets in ROLES.items()
               for s in snippets])
    so = root / "stackoverflow"
    write_sql(so / "stackoverflow.sqlite",
              [(split, user, p) for (user, split), posts in POSTS.items() for p in posts])
    (so / "stackoverflow.word_count").write_text(
        "".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)))
    (so / "stackoverflow.tag_count").write_text(json.dumps(TAGS))
    rng = np.random.default_rng(0)
    rows = [(split, w, {"label": int(rng.integers(0, 62)),
                        "pixels": rng.random((28, 28)).astype(np.float32)})
            for split in ("all_train", "all_test") for w in ("f0000_14", "f0001_41")
            for _ in range(3)]
    write_sql(root / "tff" / "emnist_all.sqlite", rows)
    rows = [(split, cid, {"coarse_label": int(rng.integers(0, 20)),
                          "image": rng.integers(0, 256, (32, 32, 3)),
                          "label": int(rng.integers(0, 100))})
            for split, ids in (("train", ("c0", "c1")), ("test", ("t0",))) for cid in ids
            for _ in range(2)]
    write_sql(root / "tff" / "cifar100.sqlite", rows)
    return root


SMALL = ["clients=2", "clients_per_round=2", "rounds=1", "batch_size=2", "progress=false",
         "ray.workers=1", "checkpoint_every=0"]
PRESETS = {
    "emnist_cr": ("tff", ["federated_eval.clients=all"], "eval_accuracy"),
    "shakespeare_cnp": ("shakespeare", ["federated_eval.clients=all",
                                        "federated_eval.personalization_steps=1"],
                        "eval_accuracy"),
    "stackoverflow_nwp": ("stackoverflow", ["data.vocab_size=6"], "eval_accuracy"),
    "stackoverflow_tp": ("stackoverflow", ["data.vocab_size=6", "data.tag_vocab_size=4"],
                         "eval_recall_at_5"),
    "cifar100_ic": ("tff", [], "eval_accuracy"),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_runs_end_to_end_on_files_in_the_real_schema(preset, files, warm_actors,
                                                            tmp_path):
    where, extra, primary = PRESETS[preset]
    cfg = compose([f"task={preset}", f"data.path={files / where}", *SMALL, *extra])
    res = run_simulation(cfg, tmp_path / "run", actors=warm_actors)
    summary = res.summary
    assert summary["rounds_completed"] == 1 and summary["primary_metric"] == primary
    value = summary["final"][primary]
    assert value is not None and 0.0 <= value <= 1.0
    assert math.isfinite(summary["final"]["eval_loss"])
    # Reddi et al.'s best method and rates
    assert summary["config"]["server"]["optimizer"] == (
        "adagrad" if preset == "stackoverflow_tp" else "yogi")
    if "federated_eval.clients=all" in extra:
        assert summary["final"]["fed_clients"] >= 1
        assert 0.0 <= summary["final"]["fed_accuracy_p50"] <= 1.0
    if preset == "shakespeare_cnp":
        assert summary["task"] == "next_token" and summary["final"]["pers_clients"] >= 1


@pytest.mark.slow  # a fresh process, as a user runs it
def test_a_users_subclassed_model_trains_a_preset_from_the_command_line(files, tmp_path):
    """examples/custom_task.py's subclassed GRU, with a Keras metric by name, on the
    Shakespeare preset, through scripts/simulate.py."""
    from tests.test_examples import _simulate

    proc = _simulate("task=shakespeare_cnp", f"data.path={files / 'shakespeare'}",
                     "model.builder=examples.custom_task:build", "clients=2",
                     "clients_per_round=2", "batch_size=2", "progress=false",
                     "model.metrics=[accuracy,num_tokens]", "federated_eval.clients=all",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "clients' 10th percentile" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["model"]["builder"] == "examples.custom_task:build"
    assert summary["model"] == "examples.custom_task:build"
    assert summary["final"]["eval_num_tokens"] > 0 and summary["final"]["fed_clients"] == 2

"""The command line as users run it: scripts/simulate.py through Hydra."""

from __future__ import annotations

import json

import pytest
from helpers import simulate


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_end_to_end_run_writes_metrics_summary_and_plot(tmp_path):
    """DP under SecAgg+ through the command line (a plain command-line run, with
    the default dp=none, is tests/test_cluster.py's; DP sweeps, tests/test_sweep.py's)."""
    dp, secagg = "gaussian", "secagg_plus"
    run_dir = tmp_path / "run"
    proc = simulate("clients=20", "clients_per_round=5", "rounds=2", "model=logreg", f"dp={dp}",
                    f"secagg={secagg}", "ray.num_cpus=2", "ray.workers=1", "progress=false",
                    f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("train_loss", "eval_loss", "eval_accuracy", "clients", "round_seconds"):
            assert r[key] is not None, key
        assert 0 <= r["eval_accuracy"] <= 1 and r["clients"] == 5
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["config"]["clients"] == 20 and summary["config"]["model"]["name"] == "logreg"
    assert summary["final"]["eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert (run_dir / "metrics.png").exists()
    assert "test accuracy" in proc.stdout
    assert all(r["epsilon"] > 0 for r in rows) and rows[1]["epsilon"] > rows[0]["epsilon"]
    assert summary["privacy"]["epsilon"] == rows[-1]["epsilon"]
    assert summary["config"]["server"]["weighting"] == "uniform"
    assert "epsilon" in proc.stdout
    assert all(r["secagg"] == "ok" and r["secagg_bits"] > 0 for r in rows)


BAD_INPUTS = [
    (["clients=0"], "clients=0: allowed is an integer >= 1"),
    (["clients=-5"], "clients=-5"),
    (["clients_per_round=101"], "clients_per_round=101: allowed is an integer in [1, clients=100]"),
    (["model=transformer"], "model=transformer: unknown option; allowed: char_lstm, cnn, emnist_cnn, keras, logreg, mlp, resnet_gn, tag_logreg, word_lstm"),
    (["data=imagenet"], "data=imagenet: unknown option; allowed: digits, emnist, leaf, mnist, shakespeare, stackoverflow, synthetic, synthetic_iid, tff_client_data"),
    (["task=nope"], "task=nope: unknown option; allowed: cifar100_ic, emnist_cr, shakespeare_cnp, stackoverflow_nwp, stackoverflow_tp"),
    (["federated_eval.clients=some"], "federated_eval.clients=some: allowed is 0 (off), an integer >= 1 or all"),
    (["federated_eval.clients=5"], "federated_eval.clients=5: allowed is 0 for data=digits"),
    (["model=logreg", "model.metrics=[accuracy,AUC]"],
     "model.metrics=AUC: allowed is a metric of task classification (accuracy)"),
    (["client.learning_rate=0"], "client.learning_rate=0.0: allowed is a finite number > 0"),
    (["server.learning_rate=-1"], "server.learning_rate=-1.0"),
    (["data=mnist", "data.path=/nonexistent/mnist.npz"], "file not found: /nonexistent/mnist.npz"),
    (["data=mnist"], "data.path"),
    (["no_such_key=1"], "no_such_key: unknown config key"),
    (["model.no_such_key=1"], "model.no_such_key: unknown config key"),
    (["clients=many"], "clients: Value 'many'"),
    (["model=cnn", "data=synthetic"], "model=cnn: allowed is logreg or mlp"),
    (["dp=renyi"], "dp=renyi: unknown option; allowed: banded_mf, blt, distributed_skellam, "
     "gaussian, gaussian_adaptive, laplace, none, tree_adaptive, tree_aggregation"),
    (["dp=gaussian_adaptive", "dp.noise_multiplier=1.0"], "too low to achieve the desired"),
    (["dp=gaussian", "dp.accountant=pld"], "dp.accountant=pld: allowed is rdp with sampling=uniform"),
    (["dp=gaussian", "dp.noise_multiplier=-1"], "dp.noise_multiplier=-1.0"),
    (["dp=laplace", "dp.epsilon=0"], "dp.epsilon=0.0: allowed is a finite number > 0"),
    (["dp=gaussian", "server.weighting=num_examples"], "server.weighting=num_examples"),
    (["dp=distributed_skellam"], "distributed_skellam only with secagg=secagg or secagg=secagg_plus"),
    (["aggregator=krum", "aggregator.byzantine=50"],
     "aggregator.byzantine=50: allowed is an integer in [0, 3] with aggregator.kind=krum"),
    (["aggregator=median", "dp=gaussian"], "dp.mechanism=gaussian: allowed is none with "
     "aggregator.kind=median"),
    (["algorithm=fedsgd"], "algorithm=fedsgd: unknown option; allowed: fedavg, fedprox"),
    (["algorithm=scaffold", "secagg=secagg_plus"], "secagg.protocol=secagg_plus: allowed is "
     "none with algorithm.name=scaffold"),
    (["algorithm=mime_lite", "dp=gaussian"], "dp.mechanism=gaussian: allowed is none with "
     "algorithm.name=mime_lite"),
    (["algorithm=fedprox", "client.vectorize=4"], "client.vectorize=4: allowed is 0 or 1 with "
     "algorithm.name=fedprox"),
    (["algorithm.mu=0.5"], "algorithm.mu=0.5: allowed is 0 with algorithm.name=fedavg"),
    (["secagg=homomorphic"], "secagg=homomorphic: unknown option; allowed: none, secagg, secagg_plus"),
    (["secagg=secagg", "secagg.dropout=1.5"], "secagg.dropout=1.5: allowed is a probability"),
    (["secagg=secagg_plus", "secagg.neighbours=3"], "secagg.neighbours=3: allowed is an even"),
    (["client.optimizer=dp_sgd", "client.batch_sampling=shuffle", "client.num_microbatches=3"],
     "client.num_microbatches=3: allowed is a divisor of batch_size=10"),
    (["client.optimizer=dp_sgd", "client.num_microbatches=5"],
     "client.num_microbatches=5: allowed is null with client.batch_sampling=poisson"),
    (["client.optimizer=adamw"], "client.optimizer=adamw: allowed is one of sgd, dp_sgd"),
    (["faults.client_dropout=1.5"], "faults.client_dropout=1.5: allowed is a probability in [0, 1)"),
    (["sampling=poisson", "faults.over_selection=0.3"], "faults.over_selection=0.3: allowed is 0"),
    (["sampling=min_sep"], "sampling.min_sep=None: allowed is an integer >= 1 with sampling=min_sep"),
    (["sampling=min_sep", "sampling.min_sep=11"],
     "sampling.min_sep=11: allowed is an integer in [1, clients // clients_per_round = 10]"),
    (["dp=banded_mf"], "sampling=uniform: allowed is epochs or min_sep with "
     "dp.mechanism=banded_mf"),
    (["dp=tree_aggregation", "sampling=min_sep", "sampling.min_sep=4"],
     "dp.restart_every=epoch: allowed is an integer <= sampling.min_sep=4"),
    # Refused (connection refused) and silent (a non-routable address: the timeout).
    (["ray.address=ray://127.0.0.1:9"], "ray.address='ray://127.0.0.1:9': no Ray cluster answers"),
    (["ray.address=10.255.255.1:6379", "ray.connect_timeout_s=2"],
     "ray.address='10.255.255.1:6379': "),
]


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line_exit_2_and_no_results(tmp_path, args, message):
    run_dir = tmp_path / "run"
    proc = simulate(*args, "rounds=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("fedsim: error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "summary.json").exists()

"""The seams a user plugs into without editing fedsim: a DP mechanism and a
server algorithm of their own (examples/), from Python and from Hydra."""

from __future__ import annotations

import dataclasses

import dp_accounting
import numpy as np
import pytest
from helpers import logreg_local_sgd

from examples.custom_mechanism import NumpyGaussian, NumpyGaussianAggregator
from fedsim.config import DPConfig, ModelConfig, RayConfig, ServerConfig, SimConfig
from fedsim.errors import ConfigError, FedsimError
from fedsim.privacy.accounting import build_accountant
from fedsim.privacy.mechanisms.base import Mechanism, resolve_mechanism


def _dp_cfg(**kw) -> SimConfig:
    base = dict(clients=30, clients_per_round=10, rounds=2, local_epochs=1,
                model=ModelConfig(name="logreg"), ray=RayConfig(workers=1), progress=False,
                dp=DPConfig(mechanism="gaussian", noise_multiplier=0.8, l2_norm_clip=1.0),
                server=ServerConfig(weighting="uniform"))
    base.update(kw)
    return SimConfig(**base)


def test_numpy_gaussian_aggregator_equals_the_builtin_gaussian():
    """The user's mechanism computes what dp=gaussian computes (TF Privacy's
    query with numpy noise): same clipping, same noise stream, same event."""
    from fedsim.privacy.queries import DPQueryAggregator

    cfg = _dp_cfg()
    ours = NumpyGaussian().build_aggregator(cfg)
    builtin = DPQueryAggregator(cfg.dp, cfg.clients_per_round)
    rng = np.random.default_rng(5)
    deltas = [rng.normal(size=50).astype(np.float32) * s for s in (0.1, 0.5, 3.0, 10.0)]
    deltas.append(np.full(50, np.nan, np.float32))  # zeroed by both
    sums = []
    for agg in (ours, builtin):
        state = agg.initial_state()
        params = agg.client_params(state)
        partial = agg.zero_partial(50)
        for d in deltas:
            partial = agg.accumulate(params, partial, d, 7)
        update, _, m = agg.finalize(state, partial, 5, np.random.default_rng(11))
        sums.append((update, m))
    (a, ma), (b, mb) = sums
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(a, np.zeros_like(a))
    assert ma["dp_event"] == dp_accounting.GaussianDpEvent(0.8)
    # (TF Privacy reports its float32 state's multiplier; the accountant rounds it)
    assert mb["dp_event"].noise_multiplier == pytest.approx(0.8, rel=1e-7)
    for k in ("clip", "clipped_fraction", "zeroed", "noise_std"):
        assert ma[k] == pytest.approx(mb[k])
    assert ma["zeroed"] == 1 and ma["clipped_fraction"] == pytest.approx(3 / 5)


def test_resolve_mechanism_names_objects_and_errors():
    assert resolve_mechanism("gaussian").name == "gaussian"
    assert resolve_mechanism("examples.custom_mechanism:NumpyGaussian").name == \
        "examples.custom_mechanism:NumpyGaussian"
    mine = NumpyGaussian()
    assert resolve_mechanism(mine) is mine
    with pytest.raises(ConfigError, match=r"^dp.mechanism=examples.nothing:X: allowed is an importable module before"):
        resolve_mechanism("examples.nothing:X")
    with pytest.raises(ConfigError, match="'Missing' not found"):
        resolve_mechanism("examples.custom_mechanism:Missing")
    with pytest.raises(ConfigError, match="gives NumpyGaussianAggregator"):
        resolve_mechanism("examples.custom_mechanism:NumpyGaussianAggregator")


def test_capabilities_are_enforced_for_a_users_mechanism():
    class NeedsSecureSum(NumpyGaussian):
        secure_sum = "required"
        calibratable = False

    with pytest.raises(ConfigError, match=r"^secagg=none: allowed is secagg or secagg_plus with"):
        NeedsSecureSum().check(_dp_cfg())
    with pytest.raises(ConfigError, match=r"^dp.target_epsilon=1.0: allowed is null with"):
        NeedsSecureSum().check(dataclasses.replace(
            _dp_cfg(secagg=dataclasses.replace(SimConfig().secagg, protocol="secagg")),
            dp=DPConfig(mechanism="gaussian", target_epsilon=1.0)))


def test_custom_mechanism_example_runs_and_is_accounted(warm_actors):
    """examples/custom_mechanism.py from Python: the accountant composes the
    user's events exactly as it composes dp=gaussian's."""
    from examples.custom_mechanism import main

    result = main(rounds=2, actors=warm_actors)
    privacy = result.summary["privacy"]
    assert privacy["mechanism"] == "examples.custom_mechanism:NumpyGaussian"
    assert result.summary["config"]["dp"]["mechanism"] == privacy["mechanism"]
    want = build_accountant(_dp_cfg())
    for _ in range(2):
        want.record(want.round_event(dp_accounting.GaussianDpEvent(0.8)))
    assert privacy["epsilon"] == pytest.approx(want.epsilon(), rel=1e-12)
    assert [r["noise_std"] for r in result.metrics] == pytest.approx([0.08, 0.08])
    assert all(np.isfinite(r["eval_loss"]) for r in result.metrics)


def test_custom_mechanism_from_hydra_with_target_epsilon(warm_actors):
    """``dp.mechanism=module:callable`` from the command line's composition, and
    calibration to ``dp.target_epsilon`` through the user's event."""
    from test_golden import compose

    from fedsim.simulation import run_simulation

    cfg = compose(["clients=30", "clients_per_round=10", "rounds=2", "local_epochs=1",
                   "model=logreg", "ray.workers=1", "progress=false", "dp=gaussian",
                   "dp.mechanism=examples.custom_mechanism:NumpyGaussian",
                   "dp.target_epsilon=5.0"])
    result = run_simulation(cfg, actors=warm_actors)
    privacy = result.summary["privacy"]
    assert privacy["mechanism"] == "examples.custom_mechanism:NumpyGaussian"
    assert privacy["epsilon"] <= 5.0
    assert privacy["epsilon"] == pytest.approx(5.0, rel=1e-3)


def test_unpicklable_part_is_refused_in_one_line():
    import threading

    from fedsim.simulation import run_simulation

    class Locked(NumpyGaussian):
        def __init__(self) -> None:
            self.lock = threading.Lock()

    with pytest.raises(FedsimError, match=r"^mechanism=: cannot be sent to the Ray actors, it does not pickle") as err:
        run_simulation(_dp_cfg(), mechanism=Locked())
    assert "\n" not in str(err.value)


def test_mechanism_protocol_has_few_abstract_methods():
    assert Mechanism.__abstractmethods__ == {"round_event", "build_aggregator"}
    assert issubclass(NumpyGaussianAggregator, __import__(
        "fedsim.aggregation.base", fromlist=["Aggregator"]).Aggregator)


def test_fedprox_client_update_equals_numpy_and_mu_zero_is_fedavg():
    """The trainer honours the algorithm's proximal_mu: a client's update equals a
    direct numpy computation of FedProx's local SGD; at mu = 0 it is FedAvg's."""
    from fedsim.client.local import LocalTrainer, epoch_order
    from fedsim.config import ClientConfig
    from fedsim.models.spec import model_spec

    rng = np.random.default_rng(3)
    x = rng.normal(size=(23, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 5, size=23).astype(np.int32)
    trainer = LocalTrainer(model_spec(ModelConfig(name="logreg")), ClientConfig(learning_rate=0.3),
                           (4, 4, 1), 5, batch_size=5, local_epochs=2, seed=1)
    w0 = rng.normal(scale=0.3, size=trainer.num_parameters).astype(np.float32)
    order = epoch_order(23, 2, np.random.default_rng(9))
    for mu in (0.5, 2.0):
        got = trainer.train(w0, x, y, np.random.default_rng(9), proximal_mu=mu).delta
        want = logreg_local_sgd(w0, x, y, order, 5, 2, 0.3, 5, mu=mu)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
        # the proximal term pulls towards the global model: a shorter update
        assert np.linalg.norm(got) < np.linalg.norm(
            trainer.train(w0, x, y, np.random.default_rng(9)).delta)
    plain = trainer.train(w0, x, y, np.random.default_rng(9)).delta
    assert np.array_equal(trainer.train(w0, x, y, np.random.default_rng(9),
                                        proximal_mu=0.0).delta, plain)
    np.testing.assert_allclose(plain, logreg_local_sgd(w0, x, y, order, 5, 2, 0.3, 5),
                               rtol=2e-4, atol=2e-6)


def test_algorithm_resolution_and_trainer_refusal():
    from examples.custom_algorithm import DecayingProx
    from fedsim.algorithms.base import Algorithm, resolve_algorithm
    from fedsim.algorithms.fedavg import FedAvg
    from fedsim.algorithms.fedprox import FedProx
    from fedsim.config import AlgorithmConfig, ClientConfig
    from fedsim.simulation import run_simulation

    cfg = _dp_cfg(dp=DPConfig())
    assert isinstance(resolve_algorithm("fedavg", cfg), FedAvg)
    assert resolve_algorithm(AlgorithmConfig("fedprox", mu=0.3), cfg).__class__ is FedProx
    hydra = resolve_algorithm(AlgorithmConfig("examples.custom_algorithm:DecayingProx",
                                              args={"mu": 0.4}), cfg)
    assert isinstance(hydra, DecayingProx) and hydra.mu == 0.4
    state = hydra.initial_state(np.zeros(3, np.float32))
    assert hydra.client_payload(state) == {"proximal_mu": 0.4}
    state, _ = hydra.apply(state, np.zeros(3, np.float32), np.ones(3, np.float32), {})
    assert hydra.client_payload(state) == {"proximal_mu": 0.4 / np.sqrt(2)}
    assert Algorithm.__abstractmethods__ == {"apply"}
    with pytest.raises(ConfigError, match=r"^algorithm.name=fedsgd: allowed is one of fedavg"):
        SimConfig(algorithm="fedsgd")
    with pytest.raises(ConfigError, match=r"^algorithm.mu=0.1: allowed is 0 with "
                                          r"algorithm.name=fedavg"):
        SimConfig(algorithm=AlgorithmConfig("fedavg", mu=0.1))
    with pytest.raises(ConfigError, match=r"^algorithm.name=examples.custom_algorithm:Nope: "
                                          r"allowed is an attribute that exists"):
        resolve_algorithm(AlgorithmConfig("examples.custom_algorithm:Nope"), cfg)
    vectorized = _dp_cfg(dp=DPConfig(), client=ClientConfig(vectorize=4))
    with pytest.raises(ConfigError, match=r"^algorithm.name=examples.custom_algorithm:"
                                          r"DecayingProx: allowed is an algorithm whose "
                                          r"clients need only"):
        run_simulation(vectorized, algorithm=DecayingProx(vectorized, mu=0.1))


def test_user_algorithm_example_runs_from_python(warm_actors):
    """examples/custom_algorithm.py: a decaying proximal term from Python, on
    label-skewed digits."""
    from examples.custom_algorithm import main

    result = main(rounds=2, mu=0.1, actors=warm_actors)
    assert (result.summary["config"]["algorithm"]["name"]
            == "examples.custom_algorithm:DecayingProx")
    assert [r["round"] for r in result.metrics] == [1, 2]
    assert all(np.isfinite(r["eval_loss"]) and r["update_norm"] > 0 for r in result.metrics)


def test_user_callbacks_see_the_rounds_add_metrics_and_stop(warm_actors, tmp_path):
    """A user's callback: its hooks run in order, a key it adds to a row reaches
    metrics.jsonl, and its stop reason ends the run."""
    import json

    from fedsim.results.callbacks import Callback
    from fedsim.simulation import run_simulation

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[tuple] = []

        def on_run_start(self, ctx) -> None:
            self.events.append(("start", ctx.first_round, ctx.accountant is None))

        def stop_before_round(self, ctx, round_num):
            return "two rounds are enough" if round_num == 3 else None

        def on_round_end(self, ctx, row) -> None:
            row["twice_the_round"] = 2 * row["round"]
            self.events.append(("round", row["round"]))

        def on_run_end(self, ctx) -> None:
            self.events.append(("end", len(ctx.rows)))

        def on_summary(self, ctx, summary, weights) -> None:  # outputs written, actors gone
            self.events.append(("summary", summary["rounds_completed"],
                                (ctx.output_dir / "summary.json").is_file(), weights.dtype.name))

        def close(self) -> None:
            self.events.append(("close",))

    rec = Recorder()
    cfg = _dp_cfg(dp=DPConfig(), rounds=5, server=ServerConfig())
    result = run_simulation(cfg, tmp_path / "run", callbacks=[rec], actors=warm_actors)
    assert rec.events == [("start", 1, True), ("round", 1), ("round", 2), ("end", 2),
                          ("summary", 2, True, "float32"), ("close",)]
    assert result.summary["stop_reason"] == "two rounds are enough"
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["twice_the_round"] for r in logged] == [2, 4]

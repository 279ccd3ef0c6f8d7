"""Example-level DP-SGD in clients: TF Privacy's accounting numbers, clipping,
reproducible noise, equivalence with plain SGD, and the tutorial script;
Poisson-sampled batches, noise from fedsim.privacy.noise, and accounting that charges
exactly the steps the trainer runs (Poisson: amplified; shuffle: no
amplification). Real TensorFlow, TF Privacy and dp-accounting throughout."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from helpers import small_config
from scipy import stats

import fedsim.client.dp_sgd as dps
from fedsim.client.dp_sgd import (
    DPSGDTrainer,
    client_example_epsilon,
    dp_sgd_epsilon,
    dp_sgd_event,
    microbatch_size,
)
from fedsim.client.local import LocalTrainer, epoch_order
from fedsim.config import ClientConfig, DPConfig, ModelConfig, ServerConfig, SimConfig
from fedsim.errors import ConfigError
from fedsim.models.spec import model_spec
from fedsim.simulation import run_simulation

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 1)


def _data(n: int, seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    x = (scale * rng.random((n, *SHAPE))).astype(np.float32)
    return x, rng.integers(0, 10, size=n).astype(np.int32)


def _cfg(**kw) -> ClientConfig:
    base = dict(optimizer="dp_sgd", learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=0.0)
    base.update(kw)
    return ClientConfig(**base)


# --------------------------------------------------------------------------- accounting


def _tf_privacy_statement_eps(n, batch, z, epochs, delta, microbatching, accountant="RDP"):
    """"Epsilon assuming Poisson sampling" as printed by TF Privacy 0.9."""
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as lib

    text = lib.compute_dp_sgd_privacy_statement(
        n, batch, epochs, z, delta, used_microbatching=microbatching,
        accountant_type=lib.AccountantType[accountant])
    return float(re.search(r"Poisson sampling \(\*\):\s+([0-9.]+)", text).group(1))


def test_tutorial_epsilon_is_tf_privacys():
    eps = dp_sgd_epsilon(60_000, 250, 1.3, 3, 1e-5)
    assert round(eps, 3) == 0.563  # the tutorial's "eps = 0.563" (720 steps)
    assert dp_sgd_event(60_000, 250, 1.3, 3).count == 720
    for args, micro, acct in [((60_000, 250, 1.3, 3, 1e-5), False, "rdp"),
                              ((60_000, 250, 1.3, 3, 1e-5), False, "pld"),
                              ((60_000, 256, 1.1, 60, 1e-5), False, "rdp"),
                              ((10_000, 64, 2.0, 5.0, 1e-5), True, "rdp"),
                              ((1_438, 250, 1.3, 3, 1e-5), True, "rdp")]:
        ours = dp_sgd_epsilon(*args, accountant=acct, used_microbatching=micro)
        assert f"{ours:.3f}" == f"{_tf_privacy_statement_eps(*args, micro, acct.upper()):.3f}"


@pytest.mark.parametrize("batch,z,epochs,published,tight", [
    (256, 1.3, 15, 1.19, 0.955), (256, 1.1, 60, 3.01, 2.597)])
def test_published_mnist_table_rows(batch, z, epochs, published, tight):
    """TF Privacy's tutorials/README.md table (MNIST, 60,000 examples, delta 1e-5)
    was computed with the classic RDP -> (eps, delta) conversion over the
    tutorial's orders; the same event gives the published number that way, and
    dp-accounting's tighter conversion (what dp_sgd_epsilon reports) less."""
    event = dp_sgd_event(60_000, batch, z, epochs)
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    acct = dp_accounting.rdp.RdpAccountant(orders).compose(event)
    classic = np.min(acct.rdp - math.log(1e-5) / (np.asarray(orders) - 1))
    assert round(float(classic), 2) == published
    assert round(dp_sgd_epsilon(60_000, batch, z, epochs, 1e-5), 3) == tight


def test_client_epsilon_composes_rounds():
    # 100 examples, batch 30: q = 0.3, ceil(1 / 0.3) = 4 steps per round.
    one = client_example_epsilon(100, 30, 1.1, 1, 1, 1e-5)
    assert one == pytest.approx(dp_sgd_epsilon(100, 30, 1.1, 1, 1e-5), rel=1e-12)
    five = client_example_epsilon(100, 30, 1.1, 1, 5, 1e-5)
    steps20 = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(1.1)), 20)
    expected = dp_accounting.rdp.RdpAccountant().compose(steps20).get_epsilon(1e-5)
    assert five == pytest.approx(expected, rel=1e-9)
    assert one < five < 5 * one
    assert client_example_epsilon(100, 30, 1.1, 1, 0, 1e-5) == 0.0
    assert client_example_epsilon(100, 30, 0.0, 1, 1, 1e-5) == math.inf
    # microbatches of > 1 example: sensitivity doubles, as TF Privacy's used_microbatching
    assert client_example_epsilon(100, 30, 1.1, 1, 5, 1e-5, used_microbatching=True) == \
        pytest.approx(client_example_epsilon(100, 30, 0.55, 1, 5, 1e-5), rel=1e-12)
    # a client smaller than a batch: q capped at 1 (full-batch steps, local_epochs of them)
    assert dp_sgd_event(10, 32, 1.0, 2).event.sampling_probability == 1.0
    assert dp_sgd_event(10, 32, 1.0, 2).count == 2
    with pytest.raises(ConfigError, match="accountant"):
        dp_sgd_epsilon(100, 10, 1.0, 1, 1e-5, accountant="gdp")


# --------------------------------------------------------------------------- training


def _stock_dp_step(model_cfg, w0, x, y, batches, clip, lr):
    """Reference: TF Privacy's stock DPKerasSGDOptimizer (noise 0), eagerly,
    one optimizer per microbatch count; batches = [(indices, num_microbatches)]."""
    import tensorflow as tf
    import tensorflow_privacy

    from fedsim.models.keras import FlatWeights, build_model

    model = build_model(model_cfg, SHAPE, 10, seed=0)
    flat = FlatWeights(model.trainable_variables)
    flat.assign(tf.constant(w0))
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    for idx, k in batches:
        opt = tensorflow_privacy.DPKerasSGDOptimizer(
            l2_norm_clip=clip, noise_multiplier=0.0, num_microbatches=k, learning_rate=lr)
        with tf.GradientTape() as tape:
            loss = loss_fn(y[idx], model(x[idx], training=True))
        opt.minimize(loss, model.trainable_variables, tape=tape)
    return w0 - flat.get().numpy()


@pytest.mark.parametrize("sampling", ["shuffle", "poisson"])
def test_per_example_clipping_bounds_a_step(sampling):
    """Noise 0, one microbatch per example, one step on inputs with huge gradients:
    the update is lr * mean of clipped gradients, so its L2 norm is <= lr * C;
    plain SGD on the same batch moves far more. Batch = all 16 examples, so the
    Poisson step (q = 1, divided by q * n = 16) is the same full-batch step."""
    lr, clip = 0.1, 1.0
    x, y = _data(16, seed=1, scale=1000.0)
    mc = ModelConfig(name="logreg")
    dp = DPSGDTrainer(model_spec(mc), _cfg(learning_rate=lr, l2_norm_clip=clip, batch_sampling=sampling),
                      SHAPE, 10, 16, 1)
    w0 = dp.flat.get().numpy()
    d_dp = dp.train(w0, x, y, np.random.default_rng(3)).delta
    norm = float(np.linalg.norm(d_dp))
    assert 0.1 * lr * clip < norm <= lr * clip * (1 + 1e-5)
    plain = LocalTrainer(model_spec(mc), _cfg(learning_rate=lr), SHAPE, 10, 16, 1)
    d_plain = plain.train(w0, x, y, np.random.default_rng(3)).delta
    assert np.linalg.norm(d_plain) > 100 * lr * clip  # not bounded without clipping
    # and it is TF Privacy's own step
    order = epoch_order(16, 1, np.random.default_rng(3))
    ref = _stock_dp_step(mc, w0, x, y, [(order, 16)], clip, lr)
    np.testing.assert_allclose(d_dp, ref, rtol=1e-5, atol=1e-7)


def test_microbatches_and_short_batch_match_tf_privacy():
    """num_microbatches 5 of batch 10 (2 examples each) on 23 examples: batches of
    10, 10, and the short one cut to 2 (one microbatch); each step equals TF
    Privacy's DPKerasSGDOptimizer with that microbatch count (clip active)."""
    x, y = _data(23, seed=2)
    mc = ModelConfig(name="mlp", hidden=[8])
    dp = DPSGDTrainer(model_spec(mc), _cfg(l2_norm_clip=0.05, num_microbatches=5, batch_sampling="shuffle"),
                      SHAPE, 10, 10, 1)
    assert dp.microbatch_size == 2 and dp.used_microbatching and dp.steps_per_epoch(23) == 3
    w0 = dp.flat.get().numpy()
    result = dp.train(w0, x, y, np.random.default_rng(4))
    order = epoch_order(23, 1, np.random.default_rng(4))
    ref = _stock_dp_step(mc, w0, x, y, [(order[:10], 5), (order[10:20], 5), (order[20:22], 1)],
                         0.05, 0.1)
    np.testing.assert_allclose(result.delta, ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(ConfigError, match="num_microbatches"):
        microbatch_size(10, 4)


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_noise_is_reproducible_and_has_the_documented_scale(sampling):
    """Same rng state -> bit-identical deltas, whatever ran before and in a fresh
    trainer; another rng -> other noise; noise std on the sum = z * C; one trace
    for clients of any size."""
    z, clip, lr, n = 2.0, 0.5, 0.01, 40
    x, y = _data(n, seed=5)
    mc = ModelConfig(name="logreg")  # 650 parameters
    noisy = DPSGDTrainer(model_spec(mc), _cfg(learning_rate=lr, l2_norm_clip=clip, noise_multiplier=z,
                                  batch_sampling=sampling), SHAPE, 10, n, 1)
    w0 = noisy.flat.get().numpy()
    a = noisy.train(w0, x, y, np.random.default_rng(7)).delta
    other = noisy.train(w0, x[:13], y[:13], np.random.default_rng(8)).delta  # another client
    again = noisy.train(w0, x, y, np.random.default_rng(7)).delta
    fresh = DPSGDTrainer(model_spec(mc), _cfg(learning_rate=lr, l2_norm_clip=clip, noise_multiplier=z,
                                  batch_sampling=sampling),
                         SHAPE, 10, n, 1).train(w0, x, y, np.random.default_rng(7)).delta
    assert np.array_equal(a, again) and np.array_equal(a, fresh)
    assert not np.allclose(a, other)
    assert noisy._train.experimental_get_tracing_count() == 1
    # one full-batch step: delta = lr * (clipped mean + noise / n), so the noise
    # part is the difference to the noiseless run with the same rng
    quiet = DPSGDTrainer(model_spec(mc), _cfg(learning_rate=lr, l2_norm_clip=clip, batch_sampling=sampling),
                         SHAPE, 10, n, 1)
    base = quiet.train(w0, x, y, np.random.default_rng(7)).delta
    b = noisy.train(w0, x, y, np.random.default_rng(9)).delta
    noise_a, noise_b = (a - base) * n / lr, (b - quiet.train(
        w0, x, y, np.random.default_rng(9)).delta) * n / lr
    assert np.std(noise_a) == pytest.approx(z * clip, rel=0.1)
    assert abs(np.corrcoef(noise_a, noise_b)[0, 1]) < 0.15  # independent streams


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_no_noise_huge_clip_equals_plain_sgd(momentum):
    """Noise 0 and a clip no gradient reaches: the mean of per-example gradients is
    the gradient of the mean loss, so DP-SGD on shuffled batches is LocalTrainer's
    SGD (short last batch included; momentum reset per client)."""
    x, y = _data(23, seed=6)
    mc = ModelConfig(name="mlp", hidden=[16])
    cfg = _cfg(l2_norm_clip=1e6, momentum=momentum, batch_sampling="shuffle")
    dp = DPSGDTrainer(model_spec(mc), cfg, SHAPE, 10, 10, 2, seed=3)
    plain = LocalTrainer(model_spec(mc), cfg, SHAPE, 10, 10, 2, seed=3)
    w0 = dp.flat.get().numpy()
    for seed in (10, 11):  # two clients in a row: no state carried over
        r_dp = dp.train(w0, x, y, np.random.default_rng(seed))
        r_plain = plain.train(w0, x, y, np.random.default_rng(seed))
        np.testing.assert_allclose(r_dp.delta, r_plain.delta, rtol=1e-4, atol=1e-6)
        assert r_dp.loss == pytest.approx(r_plain.loss, rel=1e-5)
        assert r_dp.num_examples == 23


# --------------------------------------------------------------------------- the script


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "dp_sgd.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
def test_script_on_bundled_digits(tmp_path):
    out = tmp_path / "result.json"
    proc = _script("--epochs", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1
    m = re.search(r"test accuracy ([0-9.]+), epsilon ([0-9.]+) at delta 1e-05", line)
    assert m, line
    import json

    saved = json.loads(out.read_text())
    assert float(m.group(1)) == pytest.approx(saved["accuracy"], abs=1e-4)
    assert 0.1 < saved["accuracy"] <= 1.0
    expected = dp_sgd_epsilon(saved["num_train"], 250, 1.3, 1, 1e-5)  # 250 per batch: 1 each
    assert float(m.group(2)) == pytest.approx(expected, abs=1e-3)
    # Poisson batches by default: ceil(n / 250) steps, TF Privacy's count, as run
    assert saved["batch_sampling"] == "poisson" and saved["num_microbatches"] is None
    assert saved["steps"] == math.ceil(saved["num_train"] / 250)
    assert saved["assumption"] == "Poisson sampling of each step's batch, as run"
    assert saved["assumption"] in line


@pytest.mark.slow  # end to end, in fresh processes (`uv run pytest -m slow`)
@pytest.mark.parametrize("args,option", [(("--noise-multiplier", "-1"), "--noise-multiplier"),
                                         (("--num-microbatches", "7"), "--num-microbatches")])
def test_script_bad_value_one_line_exit_2(args, option):
    proc = _script(*args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and option in lines[0] and "allowed" in lines[0], proc.stderr


def test_dp_sgd_clients_in_a_simulation_report_example_level_beside_user_level(warm_actors):
    cfg = small_config(client=ClientConfig(optimizer="dp_sgd", learning_rate=0.1,
                                           l2_norm_clip=1.0, noise_multiplier=1.1),
                       dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0),
                       server=ServerConfig(weighting="uniform"))
    res = run_simulation(cfg, actors=warm_actors)
    privacy = res.summary["privacy"]
    assert privacy["epsilon"] > 0  # user-level, central DP
    example = privacy["example_level"]
    worst = example["worst_client"]
    assert 1 <= worst["participations"] <= cfg.rounds
    assert example["epsilon"] == pytest.approx(client_example_epsilon(
        worst["num_examples"], cfg.batch_size, 1.1, cfg.local_epochs, worst["participations"],
        cfg.client.delta))
    # Poisson batches by default, and the steps charged are those run
    assert example["batch_sampling"] == "poisson"
    assert example["assumption"] == "Poisson sampling of each step's batch, as run"
    assert example["noise_sampler"] == "numpy-float64-ziggurat"
    per_round = math.ceil(cfg.local_epochs * worst["num_examples"] / cfg.batch_size)
    assert worst["steps_per_round"] == per_round
    assert worst["steps"] == per_round * worst["participations"]
    assert all(np.isfinite(r["train_loss"]) for r in res.metrics)


# --------------------------------------------------------------------------- batch sampling
# Poisson batches, noise from fedsim.privacy.noise, and accounting that charges the steps run.

KEY_HIGH = np.iinfo(np.int64).max


def _stream(key, purpose, step, variable=0):
    """The documented stream of one draw (DPSGDTrainer, dp_sgd.step_stream), built here."""
    return np.random.default_rng(np.random.SeedSequence(
        entropy=[int(k) for k in key], spawn_key=(purpose, step, variable)))


def _key(seed, sampling, n=0, epochs=1):
    """The client's noise key: drawn first (poisson), or after the shuffles (shuffle)."""
    rng = np.random.default_rng(seed)
    if sampling == "shuffle":
        epoch_order(n, epochs, rng)
    return rng.integers(0, KEY_HIGH, size=2, dtype=np.int64)


def _poisson_indices(key, step, n, q):
    return np.flatnonzero(_stream(key, 0, step).random(n) < q)


def _charged(event) -> int:
    """DP-SGD steps a DpEvent charges: its Gaussian steps, sampled or not."""
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        return event.count * _charged(event.event)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return sum(_charged(e) for e in event.events)
    if isinstance(event, (dp_accounting.PoissonSampledDpEvent, dp_accounting.GaussianDpEvent)):
        return 1
    raise AssertionError(f"unexpected event {event}")


def _eps(event, delta=1e-5) -> float:
    return float(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def test_batch_sampling_option_defaults_to_poisson_and_refuses_microbatches():
    assert ClientConfig().batch_sampling == "poisson"
    with pytest.raises(ConfigError) as err:
        ClientConfig(optimizer="dp_sgd", num_microbatches=5)
    msg = str(err.value)
    assert msg.startswith("client.num_microbatches=5: allowed is null with "
                          "client.batch_sampling=poisson") and "\n" not in msg
    assert "client.batch_sampling=shuffle" in msg
    assert ClientConfig(optimizer="dp_sgd", num_microbatches=5,
                        batch_sampling="shuffle").num_microbatches == 5
    with pytest.raises(ConfigError, match=r"^client\.batch_sampling=fixed: allowed is one of "
                                          r"poisson, shuffle$"):
        ClientConfig(optimizer="dp_sgd", batch_sampling="fixed")
    # with shuffled batches the microbatch count must still divide the batch size
    with pytest.raises(ConfigError, match="a divisor of batch_size=10"):
        SimConfig(batch_size=10, client=ClientConfig(optimizer="dp_sgd", num_microbatches=3,
                                                     batch_sampling="shuffle"))


@pytest.mark.parametrize("sampling,n,batch,epochs,micro,expected", [
    ("poisson", 23, 10, 2, None, 5),    # q = 10/23: ceil(2 * 2.3)
    ("poisson", 7, 10, 3, None, 3),     # q = 1: one full-batch step per epoch
    ("poisson", 49, 1, 1, None, 49),    # TF Privacy's float formula says 50
    ("shuffle", 23, 10, 2, None, 6),    # 10, 10, 3 per epoch
    ("shuffle", 23, 10, 2, 5, 6),       # microbatches of 2: 10, 10, 2
    ("shuffle", 23, 10, 2, 2, 4),       # microbatches of 5: the rest of 3 is skipped
])
def test_the_accountant_charges_exactly_the_steps_the_trainer_runs(
        sampling, n, batch, epochs, micro, expected):
    """The steps counted by the trainer's compiled loop and by its Keras optimizer's
    iteration counter are the steps in the client's DpEvent, and in its epsilon."""
    x, y = _data(n, seed=12)
    trainer = DPSGDTrainer(model_spec(ModelConfig(name="logreg")),
                           _cfg(noise_multiplier=1.1, batch_sampling=sampling,
                                num_microbatches=micro), SHAPE, 10, batch, epochs)
    before = int(trainer._opt.iterations)
    trainer.train(trainer.flat.get().numpy(), x, y, np.random.default_rng(3))
    ran = int(trainer._opt.iterations) - before
    assert ran == trainer.last_steps == len(trainer.last_batch_sizes) == expected
    m = trainer.microbatch_size
    event = dps.round_event(n, batch, 1.1, epochs, batch_sampling=sampling, microbatch_size=m)
    assert _charged(event) == ran
    assert dps.round_steps(n, batch, epochs, batch_sampling=sampling, microbatch_size=m) == ran
    three = client_example_epsilon(n, batch, 1.1, epochs, 3, 1e-5, batch_sampling=sampling,
                                   microbatch_size=m)
    assert three == pytest.approx(_eps(dp_accounting.SelfComposedDpEvent(event, 3)), rel=1e-12)
    if sampling == "poisson":  # each step: the Poisson-subsampled Gaussian at the batch's q
        assert event.event.sampling_probability == pytest.approx(min(batch / n, 1), abs=2**-52)


def test_poisson_batch_sizes_are_binomial():
    """500 steps on 50 examples at batch 10 (q = 0.2): the realised batch sizes are
    the documented stream's Binomial(50, 0.2) draws; mean q n and variance
    n q (1 - q) within 5 standard errors."""
    n, batch, epochs = 50, 10, 100
    x, y = _data(n, seed=13)
    trainer = DPSGDTrainer(model_spec(ModelConfig(name="logreg")), _cfg(noise_multiplier=1.0), SHAPE, 10,
                           batch, epochs)
    trainer.train(trainer.flat.get().numpy(), x, y, np.random.default_rng(21))
    sizes = trainer.last_batch_sizes
    steps = len(sizes)
    assert steps == trainer.last_steps == 500
    key = _key(21, "poisson")
    assert sizes.tolist() == [len(_poisson_indices(key, s, n, 0.2)) for s in range(steps)]
    q = 0.2
    mean, var = n * q, n * q * (1 - q)
    mu4 = var * (1 + 3 * (n - 2) * q * (1 - q))  # binomial 4th central moment
    assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / steps)
    se_var = math.sqrt((mu4 - (steps - 3) / (steps - 1) * var ** 2) / steps)
    assert abs(sizes.var(ddof=1) - var) < 5 * se_var
    assert sizes.min() < mean < sizes.max()  # sizes vary


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_poisson_step_equals_a_direct_computation(momentum):
    """Noise off, clip active, 6 examples at batch 2 for 2 epochs: 6 Poisson steps,
    one of them on an empty batch (seed 0). Recomputed eagerly here: the batch
    from the documented stream, each example's gradient clipped to C, summed,
    divided by the expected batch size q n = 2, SGD (momentum) in numpy."""
    import tensorflow as tf

    n, batch, epochs, lr, clip = 6, 2, 2, 0.1, 0.05
    x, y = _data(n, seed=14)
    mc = ModelConfig(name="mlp", hidden=[8])
    trainer = DPSGDTrainer(model_spec(mc), _cfg(learning_rate=lr, l2_norm_clip=clip, momentum=momentum),
                           SHAPE, 10, batch, epochs)
    w0 = trainer.flat.get().numpy()
    result = trainer.train(w0, x, y, np.random.default_rng(0))
    key = _key(0, "poisson")
    batches = [_poisson_indices(key, s, n, batch / n) for s in range(6)]
    assert trainer.last_steps == 6 and trainer.last_batch_sizes.tolist() == [len(b) for b in
                                                                              batches]
    assert 0 in trainer.last_batch_sizes  # an empty batch: the step still happens

    from fedsim.models.keras import FlatWeights, build_model

    model = build_model(mc, SHAPE, 10, seed=0)
    flat = FlatWeights(model.trainable_variables)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    w = w0.astype(np.float64)
    velocity = np.zeros_like(w)
    for idx in batches:
        total = np.zeros_like(w)
        flat.assign(tf.constant(w.astype(np.float32)))
        for i in idx:
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i:i + 1], model(x[i:i + 1], training=True))
            g = np.concatenate([t.numpy().ravel() for t in
                                tape.gradient(loss, model.trainable_variables)])
            total += g * min(1.0, clip / np.linalg.norm(g))
        velocity = momentum * velocity + total / batch
        w = w - lr * velocity
    # (with momentum, the empty step still moves the weights by the velocity)
    np.testing.assert_allclose(result.delta, w0 - w, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(result.delta) > 0


def test_poisson_and_shuffle_agree_when_every_batch_is_the_whole_client():
    """batch_size >= n: q = 1, so each Poisson step holds every example and divides
    by q n = n, and each shuffled step is the whole (permuted) client divided by
    its n microbatches: the same full-batch step (noise off), and the same
    epsilon (Gaussian(z) per step, nothing to amplify or shift)."""
    n, batch, epochs = 12, 16, 2
    x, y = _data(n, seed=15)
    mc = ModelConfig(name="mlp", hidden=[8])
    deltas = {}
    for sampling in ("poisson", "shuffle"):
        trainer = DPSGDTrainer(model_spec(mc), _cfg(l2_norm_clip=0.05, momentum=0.9,
                                        batch_sampling=sampling), SHAPE, 10, batch, epochs)
        deltas[sampling] = trainer.train(trainer.flat.get().numpy(), x, y,
                                         np.random.default_rng(4)).delta
        assert trainer.last_batch_sizes.tolist() == [n] * epochs
    np.testing.assert_allclose(deltas["poisson"], deltas["shuffle"], rtol=1e-5, atol=1e-7)
    eps = {s: client_example_epsilon(n, batch, 1.1, epochs, 3, 1e-5, batch_sampling=s)
           for s in ("poisson", "shuffle")}
    direct = _eps(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.1),
                                                    epochs * 3))
    assert eps["poisson"] == pytest.approx(direct, rel=1e-9)
    assert eps["shuffle"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("n,batch,micro,epochs,rounds,events", [
    # one example per microbatch, batch < n: every step 2C (Gaussian(z / 2)), 3 steps/epoch
    (23, 10, None, 1, 1, [(2, 3)]),
    (23, 10, None, 2, 4, [(2, 24)]),
    # a client within one batch: the whole data every step, sensitivity C
    (8, 10, None, 3, 2, [(1, 6)]),
    # microbatches of 2 (5 per full batch): 2 * 5 C per full batch, 2 * 1 C for the rest of 2
    (23, 10, 5, 1, 2, [(10, 4), (2, 2)]),
    # microbatches of 5 in a client of 8: one step of 1 microbatch: 2C
    (8, 10, 2, 1, 1, [(2, 1)]),
])
def test_shuffle_epsilon_is_the_unamplified_derivation(n, batch, micro, epochs, rounds, events):
    """Shuffled fixed-size batches: epsilon of Composed(SelfComposed(Gaussian(z / s), count)),
    s the per-step sensitivity in units of C (the docstring's derivation), computed
    here directly; never below the unamplified composition of the same steps, which
    the old Poisson figure for such small clients was."""
    z = 1.1
    m = microbatch_size(batch, micro)
    eps = client_example_epsilon(n, batch, z, epochs, rounds, 1e-5, batch_sampling="shuffle",
                                 microbatch_size=m)
    direct = _eps(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / s), c)
        for s, c in events]))
    assert eps == pytest.approx(direct, rel=1e-9)
    steps = sum(c for _, c in events)
    assert steps == dps.round_steps(n, batch, epochs, batch_sampling="shuffle",
                                    microbatch_size=m) * rounds
    unamplified = _eps(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z),
                                                         steps))
    assert eps >= unamplified * (1 - 1e-12)
    if micro is None and batch < n:
        # the bug: the Poisson figure (q = 10/23) for the same steps is below no amplification
        poisson = client_example_epsilon(n, batch, z, epochs, rounds, 1e-5)
        assert poisson < unamplified < eps
    if (n, micro, epochs) == (23, None, 1):  # the PLD accountant takes the same events
        pld = client_example_epsilon(n, batch, z, epochs, rounds, 1e-5, "pld",
                                     batch_sampling="shuffle", microbatch_size=m)
        assert unamplified * 0.9 < pld <= eps * 1.01


@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_dp_sgd_noise_is_the_seeded_fedsim_noise_stream(sampling):
    """C tiny and z huge (noise std z C = 1, clipped gradients <= 1e-6 each): the
    delta is lr * sum over steps of noise / denominator, with the noise drawn by
    fedsim.privacy.noise.gaussian from the documented numpy stream of (key, step, variable),
    empty Poisson batches included."""
    from fedsim.privacy import noise as fnoise

    n, batch, lr = 20, 8, 0.1
    x, y = _data(n, seed=16)
    trainer = DPSGDTrainer(model_spec(ModelConfig(name="logreg")),
                           _cfg(learning_rate=lr, l2_norm_clip=1e-6, noise_multiplier=1e6,
                                batch_sampling=sampling), SHAPE, 10, batch, 1)
    result = trainer.train(trainer.flat.get().numpy(), x, y, np.random.default_rng(5))
    key = _key(5, sampling, n)
    shapes = [tuple(v.shape) for v in trainer.model.trainable_variables]
    if sampling == "poisson":
        denominators = [batch] * math.ceil(n / batch)   # q n, every step (3 steps)
    else:
        denominators = [8, 8, 4]                         # microbatches of each batch
    assert trainer.last_steps == len(denominators) == 3
    expected = sum(lr / d * np.concatenate([
        fnoise.gaussian(_stream(key, 1, s, i), shape, 1.0).ravel()
        for i, shape in enumerate(shapes)]) for s, d in enumerate(denominators))
    np.testing.assert_allclose(result.delta, expected, rtol=1e-5, atol=1e-6)


def test_dp_sgd_noise_is_gaussian_with_tails_beyond_float32_box_muller():
    """One full-batch step of a 19,210-parameter model with C tiny: the noise on the
    sum (delta * n / lr) has mean 0, variance (z C)^2 and excess kurtosis 0 within
    5 standard errors, passes a KS test against N(0, (z C)^2), and (seed 2725)
    holds a value beyond 5.678 standard deviations, which TensorFlow's float32
    Box-Muller (uniform clamped at 1e-7) can never produce."""
    z, clip, lr, n = 2e6, 1e-6, 0.1, 10
    std = z * clip
    x, y = _data(n, seed=17)
    trainer = DPSGDTrainer(model_spec(ModelConfig(name="mlp", hidden=[256])),
                           _cfg(learning_rate=lr, l2_norm_clip=clip, noise_multiplier=z),
                           SHAPE, 10, n, 1)
    result = trainer.train(trainer.flat.get().numpy(), x, y, np.random.default_rng(2725))
    assert trainer.last_steps == 1 and trainer.last_batch_sizes.tolist() == [n]
    g = result.delta.astype(np.float64) * n / lr / std  # standardised noise (grads <= 1e-6)
    size = g.size
    assert size == 19_210
    assert abs(g.mean()) < 5 / math.sqrt(size)
    assert abs(g.var() - 1) < 5 * math.sqrt(2 / size)
    assert abs(stats.kurtosis(g)) < 5 * math.sqrt(24 / size)
    assert stats.kstest(g, "norm").pvalue > 1e-5
    assert np.abs(g).max() > math.sqrt(-2 * math.log(1e-7))  # 5.678: beyond TF's cut-off


def test_recurrent_models_get_each_microbatchs_own_gradient():
    """A GRU (examples/custom_task.py) cannot go through tf.vectorized_map's
    gradient; its microbatches run in a graph loop instead, and each gradient is
    still that microbatch's own mean loss's (checked one by one here)."""
    import tensorflow as tf

    from examples import custom_task
    from fedsim.models.spec import ModelSpec

    data = custom_task.make_data(4)
    spec = ModelSpec(custom_task.build).bind(data.task, data.example)
    trainer = DPSGDTrainer(spec, ClientConfig(optimizer="dp_sgd", l2_norm_clip=1.0,
                                              noise_multiplier=0.0),
                           data.input_shape, data.num_classes, 3, 1, seed=0)
    assert trainer._loop_microbatches
    x, y = data.train.client(3)  # padded sequences (odd client)
    x, y = tf.constant(x[:3]), tf.constant(y[:3])
    totals, grads = trainer._microbatch_grads(x, y)
    variables = trainer.model.trainable_variables
    for i in range(3):
        with tf.GradientTape() as tape:
            num, den = spec.loss(y[i:i + 1], trainer.model(x[i:i + 1], training=True))
            loss = tf.reduce_sum(num) / tf.reduce_sum(den)
        want = tape.gradient(loss, variables)
        assert float(totals[i]) == pytest.approx(float(loss), rel=1e-6)
        for g, w in zip(grads, want):
            np.testing.assert_allclose(g[i], tf.convert_to_tensor(w), rtol=1e-5, atol=1e-7)

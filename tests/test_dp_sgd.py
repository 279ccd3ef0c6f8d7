"""Example-level DP-SGD in clients: TF Privacy's accounting numbers, clipping,
reproducible noise, equivalence with plain SGD, and the tutorial script.
Real TensorFlow, TF Privacy and dp-accounting throughout."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from fedsim.client import LocalTrainer, epoch_order
from fedsim.config import ClientConfig, DPConfig, ModelConfig, ServerConfig
from fedsim.dp_sgd import (DPSGDTrainer, client_example_epsilon, dp_sgd_epsilon, dp_sgd_event,
                           microbatch_size)
from fedsim.errors import ConfigError
from fedsim.simulation import run_simulation
from helpers import small_config

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

    from fedsim.models import FlatWeights, build_model

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


def test_per_example_clipping_bounds_a_step():
    """Noise 0, one microbatch per example, one step on inputs with huge gradients:
    the update is lr * mean of clipped gradients, so its L2 norm is <= lr * C;
    plain SGD on the same batch moves far more."""
    lr, clip = 0.1, 1.0
    x, y = _data(16, seed=1, scale=1000.0)
    mc = ModelConfig(name="logreg")
    dp = DPSGDTrainer(mc, _cfg(learning_rate=lr, l2_norm_clip=clip), SHAPE, 10, 16, 1)
    w0 = dp.flat.get().numpy()
    d_dp = dp.train(w0, x, y, np.random.default_rng(3)).delta
    norm = float(np.linalg.norm(d_dp))
    assert 0.1 * lr * clip < norm <= lr * clip * (1 + 1e-5)
    plain = LocalTrainer(mc, _cfg(learning_rate=lr), SHAPE, 10, 16, 1)
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
    dp = DPSGDTrainer(mc, _cfg(l2_norm_clip=0.05, num_microbatches=5), SHAPE, 10, 10, 1)
    assert dp.microbatch_size == 2 and dp.used_microbatching and dp.steps_per_epoch(23) == 3
    w0 = dp.flat.get().numpy()
    result = dp.train(w0, x, y, np.random.default_rng(4))
    order = epoch_order(23, 1, np.random.default_rng(4))
    ref = _stock_dp_step(mc, w0, x, y, [(order[:10], 5), (order[10:20], 5), (order[20:22], 1)],
                         0.05, 0.1)
    np.testing.assert_allclose(result.delta, ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(ConfigError, match="num_microbatches"):
        microbatch_size(10, 4)


def test_noise_is_reproducible_and_has_the_documented_scale():
    """Same rng state -> bit-identical deltas, whatever ran before and in a fresh
    trainer; another rng -> other noise; noise std on the sum = z * C; one trace
    for clients of any size."""
    z, clip, lr, n = 2.0, 0.5, 0.01, 40
    x, y = _data(n, seed=5)
    mc = ModelConfig(name="logreg")  # 650 parameters
    noisy = DPSGDTrainer(mc, _cfg(learning_rate=lr, l2_norm_clip=clip, noise_multiplier=z),
                         SHAPE, 10, n, 1)
    w0 = noisy.flat.get().numpy()
    a = noisy.train(w0, x, y, np.random.default_rng(7)).delta
    other = noisy.train(w0, x[:13], y[:13], np.random.default_rng(8)).delta  # another client
    again = noisy.train(w0, x, y, np.random.default_rng(7)).delta
    fresh = DPSGDTrainer(mc, _cfg(learning_rate=lr, l2_norm_clip=clip, noise_multiplier=z),
                         SHAPE, 10, n, 1).train(w0, x, y, np.random.default_rng(7)).delta
    assert np.array_equal(a, again) and np.array_equal(a, fresh)
    assert not np.allclose(a, other)
    assert noisy._train.experimental_get_tracing_count() == 1
    # one full-batch step: delta = lr * (clipped mean + noise / n), so the noise
    # part is the difference to the noiseless run with the same rng
    quiet = DPSGDTrainer(mc, _cfg(learning_rate=lr, l2_norm_clip=clip), SHAPE, 10, n, 1)
    base = quiet.train(w0, x, y, np.random.default_rng(7)).delta
    b = noisy.train(w0, x, y, np.random.default_rng(9)).delta
    noise_a, noise_b = (a - base) * n / lr, (b - quiet.train(
        w0, x, y, np.random.default_rng(9)).delta) * n / lr
    assert np.std(noise_a) == pytest.approx(z * clip, rel=0.1)
    assert abs(np.corrcoef(noise_a, noise_b)[0, 1]) < 0.15  # independent streams


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_no_noise_huge_clip_equals_plain_sgd(momentum):
    """Noise 0 and a clip no gradient reaches: the mean of per-example gradients is
    the gradient of the mean loss, so DP-SGD is LocalTrainer's SGD (short last
    batch included; momentum reset per client)."""
    x, y = _data(23, seed=6)
    mc = ModelConfig(name="mlp", hidden=[16])
    cfg = _cfg(l2_norm_clip=1e6, momentum=momentum)
    dp = DPSGDTrainer(mc, cfg, SHAPE, 10, 10, 2, seed=3)
    plain = LocalTrainer(mc, cfg, SHAPE, 10, 10, 2, seed=3)
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


@pytest.mark.parametrize("args,option", [(("--noise-multiplier", "-1"), "--noise-multiplier"),
                                         (("--num-microbatches", "7"), "--num-microbatches")])
def test_script_bad_value_one_line_exit_2(args, option):
    proc = _script(*args)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and option in lines[0] and "allowed" in lines[0], proc.stderr


def test_dp_sgd_clients_in_a_simulation_report_example_level_beside_user_level(ray_local):
    cfg = small_config(client=ClientConfig(optimizer="dp_sgd", learning_rate=0.1,
                                           l2_norm_clip=1.0, noise_multiplier=1.1),
                       dp=DPConfig(mechanism="gaussian", noise_multiplier=1.0),
                       server=ServerConfig(weighting="uniform"))
    res = run_simulation(cfg)
    privacy = res.summary["privacy"]
    assert privacy["epsilon"] > 0  # user-level, central DP
    example = privacy["example_level"]
    worst = example["worst_client"]
    assert 1 <= worst["participations"] <= cfg.rounds
    assert example["epsilon"] == pytest.approx(client_example_epsilon(
        worst["num_examples"], cfg.batch_size, 1.1, cfg.local_epochs, worst["participations"],
        cfg.client.delta))
    assert all(np.isfinite(r["train_loss"]) for r in res.metrics)

"""Local training does exactly minibatch SGD as Keras does it, client by client."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.client.local import LocalTrainer, epoch_order
from fedsim.config import ClientConfig, ModelConfig
from fedsim.models.spec import model_spec


def _keras_reference(model_cfg, client_cfg, input_shape, w0, x, y, batch_size, epochs, rng):
    import tensorflow as tf

    from fedsim.models.keras import FlatWeights, build_model

    model = build_model(model_cfg, input_shape, 10, seed=123)
    flat = FlatWeights(model.trainable_variables)
    flat.assign(tf.constant(w0))
    opt = tf.keras.optimizers.SGD(client_cfg.learning_rate, momentum=client_cfg.momentum)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    order = epoch_order(len(x), epochs, rng)
    n = len(x)
    for e in range(epochs):
        perm = order[e * n:(e + 1) * n]
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            with tf.GradientTape() as tape:
                loss = loss_fn(y[idx], model(x[idx], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
    return w0 - flat.get().numpy()


@pytest.mark.parametrize("model_name,momentum", [("mlp", 0.0), ("cnn", 0.9), ("logreg", 0.0)])
def test_local_training_matches_keras_sgd(model_name, momentum):
    rng = np.random.default_rng(0)
    x = rng.random((23, 8, 8, 1), dtype=np.float32)  # 23 examples: a partial last batch
    y = rng.integers(0, 10, size=23).astype(np.int32)
    model_cfg = ModelConfig(name=model_name, hidden=[16], filters=[4, 8])
    client_cfg = ClientConfig(learning_rate=0.1, momentum=momentum)
    trainer = LocalTrainer(model_spec(model_cfg), client_cfg, (8, 8, 1), 10, batch_size=5, local_epochs=2,
                           seed=7)
    w0 = trainer.flat.get().numpy() + rng.normal(scale=0.01, size=trainer.num_parameters
                                                 ).astype(np.float32)
    result = trainer.train(w0, x, y, np.random.default_rng(42))
    expected = _keras_reference(model_cfg, client_cfg, (8, 8, 1), w0, x, y, 5, 2,
                                np.random.default_rng(42))
    assert result.num_examples == 23
    assert np.isfinite(result.loss) and result.loss > 0
    assert np.linalg.norm(expected) > 1e-3  # training moved the weights
    np.testing.assert_allclose(result.delta, expected, rtol=1e-4, atol=2e-6)


def test_trainer_is_reusable_across_clients_without_leaking_state():
    rng = np.random.default_rng(1)
    trainer = LocalTrainer(model_spec(ModelConfig(name="mlp", hidden=[8])),
                           ClientConfig(learning_rate=0.1, momentum=0.5), (8, 8, 1), 10,
                           batch_size=4, local_epochs=1)
    w0 = trainer.flat.get().numpy()
    xa, ya = rng.random((9, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 9).astype(np.int32)
    xb, yb = rng.random((5, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 5).astype(np.int32)
    first = trainer.train(w0, xa, ya, np.random.default_rng(3)).delta
    trainer.train(w0, xb, yb, np.random.default_rng(4))
    again = trainer.train(w0, xa, ya, np.random.default_rng(3)).delta
    np.testing.assert_array_equal(first, again)


def test_signature_graph_computes_what_its_tf_function_computes():
    """SignatureGraph calls the graph's concrete function with each argument cast
    to its spec's dtype, as the polymorphic tf.function casts numpy inputs: the
    same outputs, bit for bit; a wrong argument count is refused, not truncated."""
    import tensorflow as tf

    from fedsim.client.local import SignatureGraph

    def fn(x, idx, scale):
        return tf.reduce_sum(tf.gather(x, idx), axis=0) * scale, tf.shape(idx)[0]

    signature = [tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([None], tf.int32),
                 tf.TensorSpec([], tf.float32)]
    wrapped = SignatureGraph(fn, signature)
    reference = tf.function(fn, input_signature=signature)
    rng = np.random.default_rng(0)
    for rows in (5, 2):  # one concrete function serves every batch size
        x = rng.normal(size=(rows, 3))  # float64 and int64 inputs, cast as tf.function casts them
        idx = rng.integers(0, rows, size=7)
        got, want = wrapped(x, idx, 0.3), reference(x, idx, 0.3)
        np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
        assert got[0].dtype == tf.float32 and int(got[1]) == int(want[1]) == 7
    with pytest.raises(TypeError, match="expected 3 arguments, got 2"):
        wrapped(x, idx)

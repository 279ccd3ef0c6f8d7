"""ModelSpec: the one description of a model (builder, per-example loss, metrics),
its resolution from Python objects and ``model.builder``, and its checks."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from fedsim.config import ClientConfig, ModelConfig
from fedsim.errors import ConfigError
from fedsim.models.spec import (
    BuiltinModel,
    ModelSpec,
    accuracy,
    check_model,
    model_spec,
    sparse_categorical_crossentropy,
)


def dense_builder(input_shape, num_classes, seed):
    """A functional model of supported layers only (vectorizable)."""
    import tensorflow as tf

    inputs = tf.keras.Input(shape=tuple(input_shape))
    h = tf.keras.layers.Flatten()(inputs)
    h = tf.keras.layers.Dense(12, activation="relu",
                              kernel_initializer=tf.keras.initializers.GlorotUniform(seed))(h)
    out = tf.keras.layers.Dense(num_classes,
                                kernel_initializer=tf.keras.initializers.GlorotUniform(seed + 1))(h)
    return tf.keras.Model(inputs, out)


def subclassed_builder(input_shape, num_classes, seed):
    import tensorflow as tf

    class Tiny(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.flat = tf.keras.layers.Flatten()
            self.out = tf.keras.layers.Dense(
                num_classes, kernel_initializer=tf.keras.initializers.GlorotUniform(seed))

        def call(self, x, training=False):
            return self.out(self.flat(x) * 2.0)

    return Tiny()


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (5, 7, 3), (1, 1, 2), (3, 3, 1)])
@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
def test_builtin_parameter_count_without_tf_equals_the_built_model(name, shape):
    from fedsim.models.keras import build_model, count_parameters

    cfg = ModelConfig(name=name, hidden=[7, 5], filters=[3, 4, 2])
    assert BuiltinModel.from_config(cfg).num_parameters(shape, 10, 0) == count_parameters(
        build_model(cfg, shape, 10, 0))


def test_driver_resolves_and_counts_builtins_without_tensorflow():
    code = ("import sys; from fedsim.config import ModelConfig; "
            "from fedsim.models.spec import model_spec; "
            "s = model_spec(ModelConfig(name='cnn')); print(s.num_parameters((8, 8, 1), 10, 0), "
            "s.is_builtin, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[1:] == ["True", "False"]


def test_builtin_spec_builds_what_build_model_builds_and_pickles():
    from fedsim.models.keras import FlatWeights, build_model

    cfg = ModelConfig(name="mlp", hidden=[9])
    spec = model_spec(cfg)
    assert spec.name == "mlp" and spec.is_builtin
    assert pickle.loads(pickle.dumps(spec)) == spec
    a = FlatWeights(spec.build((8, 8, 1), 10, 3).trainable_variables).get().numpy()
    b = FlatWeights(build_model(cfg, (8, 8, 1), 10, 3).trainable_variables).get().numpy()
    np.testing.assert_array_equal(a, b)


def test_default_loss_and_metric_are_per_example_and_sum_to_the_old_sum_reduction():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    logits = tf.constant(rng.normal(size=(7, 4)).astype(np.float32))
    y = tf.constant(rng.integers(0, 4, 7).astype(np.int32))
    per = sparse_categorical_crossentropy(y, logits)
    assert per.shape == (7,)
    old = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.SUM)(y, logits)
    assert tf.reduce_sum(per).numpy() == old.numpy()  # bit for bit
    np.testing.assert_array_equal(accuracy(y, logits).numpy(),
                                  (np.argmax(logits.numpy(), 1) == y.numpy()).astype(np.float32))


def test_resolution_order_python_object_then_builder_then_builtin():
    spec = model_spec(ModelConfig(), dense_builder)
    assert spec.builder is dense_builder and spec.loss is sparse_categorical_crossentropy
    assert set(spec.metrics) == {"accuracy"} and not spec.is_builtin
    mine = ModelSpec(dense_builder, metrics={"acc": accuracy})
    assert model_spec(ModelConfig(), mine) is mine
    by_name = model_spec(ModelConfig(name="keras", builder="test_model_spec:dense_builder"))
    assert by_name.builder is dense_builder and by_name.name == "test_model_spec:dense_builder"
    assert model_spec(ModelConfig(name="logreg")).name == "logreg"
    with pytest.raises(ConfigError, match="one model per run"):
        model_spec(ModelConfig(name="keras", builder="test_model_spec:dense_builder"),
                   dense_builder)
    with pytest.raises(ConfigError, match=r"^model=int: allowed is a fedsim.models.spec"):
        model_spec(ModelConfig(), 3)


@pytest.mark.parametrize("builder,message", [
    ("no_such_module_xyz:build", "model.builder=no_such_module_xyz:build: allowed is an "
     "importable module before ':' (importing 'no_such_module_xyz' failed: "
     "ModuleNotFoundError"),
    ("test_model_spec:no_such_builder", "'no_such_builder' not found in 'test_model_spec'"),
    ("test_model_spec:np", "a callable (input_shape, num_classes, seed)"),
])
def test_bad_builder_is_one_line_naming_model_builder(builder, message):
    with pytest.raises(ConfigError) as err:
        model_spec(ModelConfig(name="keras", builder=builder))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_builder_option_is_validated_with_the_config():
    with pytest.raises(ConfigError, match="model.builder=None: allowed is module:callable"):
        ModelConfig(name="keras")
    with pytest.raises(ConfigError, match="model.builder=build: allowed is module:callable"):
        ModelConfig(name="keras", builder="build")
    with pytest.raises(ConfigError, match="model.builder=a:b: allowed is null with "
                                          "model.name=mlp"):
        ModelConfig(name="mlp", builder="a:b")
    assert ModelConfig(name="keras", builder="pkg.mod:Factory.build").builder


def test_check_model_refuses_what_cannot_train():
    shape = (8, 8, 1)
    assert check_model(ModelSpec(dense_builder), shape, 10, 0) == 64 * 12 + 12 + 12 * 10 + 10
    assert check_model(ModelSpec(subclassed_builder), shape, 10, 0) == 64 * 10 + 10
    cases = [
        (ModelSpec(lambda s, c, seed: dense_builder(s, c + 1, seed)), "[batch, 10] logits (num_classes=10"),
        (ModelSpec(lambda s, c, seed: "not a model"), "returned a str, not a tf.keras.Model"),
        (ModelSpec(lambda s, c, seed: 1 / 0), "ZeroDivisionError"),
        (ModelSpec(dense_builder, loss=lambda y, z: sparse_categorical_crossentropy(y, z)
                   .numpy().mean()), "one value per example"),
        (ModelSpec(dense_builder, metrics={"bad": lambda y, z: 1.0}), "metrics['bad']"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError) as err:
            check_model(spec, shape, 10, 0, option="model.builder")
        assert str(err.value).startswith("model.builder=") and message in str(err.value)
        assert "\n" not in str(err.value)


def test_vectorized_training_accepts_supported_functional_models_and_refuses_others():
    from fedsim.client.local import LocalTrainer
    from fedsim.client.vectorized import VectorizedTrainer, check_vectorizable

    shape = (8, 8, 1)
    spec = ModelSpec(dense_builder)
    check_vectorizable(spec, shape, 10, 0, batch_size=5, vectorize=4)
    client = ClientConfig(learning_rate=0.1)
    local = LocalTrainer(spec, client, shape, 10, 5, 1, seed=1)
    vec = VectorizedTrainer(spec, client, shape, 10, 5, 1, seed=1, max_clients_per_call=4)
    rng = np.random.default_rng(0)
    x, y = rng.random((12, *shape), dtype=np.float32), rng.integers(0, 10, 12).astype(np.int32)
    w0 = local.flat.get().numpy()
    a = local.train(w0, x, y, np.random.default_rng(1))
    b = vec.train(w0, x, y, np.random.default_rng(1))
    np.testing.assert_allclose(b.delta, a.delta, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"^client.vectorize=4: allowed is 0 or 1 with model "
                                          r".*subclassed model"):
        check_vectorizable(ModelSpec(subclassed_builder), shape, 10, 0, 5, 4)

    def residual(input_shape, num_classes, seed):
        import tensorflow as tf

        inputs = tf.keras.Input(shape=tuple(input_shape))
        h = tf.keras.layers.Flatten()(inputs)
        h = tf.keras.layers.Add()([h, tf.keras.layers.Dense(64)(h)])
        return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes)(h))

    with pytest.raises(ConfigError, match="layer Add"):
        check_vectorizable(ModelSpec(residual), shape, 10, 0, 5, 4)


def test_custom_loss_reaches_every_trainer():
    """A scaled loss scales the SGD step: the spec's loss is what trains."""
    from fedsim.client.dp_sgd import DPSGDTrainer
    from fedsim.client.local import LocalTrainer
    from fedsim.client.vectorized import VectorizedTrainer

    shape = (8, 8, 1)

    def doubled(y, logits):
        return 2.0 * sparse_categorical_crossentropy(y, logits)

    rng = np.random.default_rng(0)
    x, y = rng.random((10, *shape), dtype=np.float32), rng.integers(0, 10, 10).astype(np.int32)
    for cls, client in ((LocalTrainer, ClientConfig(learning_rate=0.01)),
                        (VectorizedTrainer, ClientConfig(learning_rate=0.01)),
                        (DPSGDTrainer, ClientConfig(optimizer="dp_sgd", learning_rate=0.01,
                                                    l2_norm_clip=1e6, noise_multiplier=0.0,
                                                    batch_sampling="shuffle"))):
        plain = cls(ModelSpec(BuiltinModel("logreg")), client, shape, 10, 10, 1, seed=0)
        twice = cls(ModelSpec(BuiltinModel("logreg"), loss=doubled), client, shape, 10, 10, 1,
                    seed=0)
        w0 = plain.flat.get().numpy()
        a = plain.train(w0, x, y, np.random.default_rng(2))
        b = twice.train(w0, x, y, np.random.default_rng(2))
        np.testing.assert_allclose(b.delta, 2 * a.delta, rtol=1e-4, atol=1e-7, err_msg=cls.__name__)
        assert b.loss == pytest.approx(2 * a.loss, rel=1e-5)


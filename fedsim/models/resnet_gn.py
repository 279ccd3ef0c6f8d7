"""The ResNet-18 with group normalization of Reddi et al. (ICLR 2021) for
CIFAR-100: TFF 0.87's ``tff.simulation.models.resnet_models.create_resnet18``
(``norm_layer=GROUP_NORM``; what ``tff.simulation.baselines.cifar100`` builds
for ``model_id='resnet18'``), a pre-activation ResNet v2.

Structure, exactly as TFF's ``create_resnet`` builds it:

* stem: Conv2D(64, 7x7, stride 2, same) -> GroupNorm -> ReLU ->
  MaxPool(3x3, stride 2, same);
* 4 stages of ``repetitions = (2, 2, 2, 2)`` basic blocks with 64, 128, 256, 512
  filters. A block is [GroupNorm -> ReLU ->] Conv2D(3x3) -> GroupNorm -> ReLU ->
  Conv2D(3x3), plus its input (through Conv2D(1x1) -> GroupNorm where the
  channel count changes); the first block of the first stage has no norm/ReLU
  before its first conv;
* GroupNorm -> ReLU -> global average pooling -> Dense(num_classes).

Every conv is ``same``-padded, without bias, He-normal; GroupNormalization is
Keras' (32 groups, epsilon 1e-3, gamma 1, beta 0); the Dense kernel is
RandomNormal(stddev=0.01), its bias zero. Convs and the Dense (kernel and
bias) carry TFF's L2 regularizer, 1e-4. For 24x24x3 crops (TFF's CIFAR-100
preprocessing) and 100 classes it has 11,227,812 parameters, all trainable.

TFF's quirk, kept: every stage runs at stride 1 (``_residual_block`` never passes
strides), so only the stem downsamples (24x24 -> 6x6) and the shortcuts' 1x1
convs only change channels.

Deliberate differences:

* the Dense outputs LOGITS: TFF's ends in ``softmax`` (fedsim's losses take
  logits; the softmax of these logits is TFF's output);
* ``input_shape`` is whatever the builder is given (TFF's task passes the
  24x24 crop size), ``num_classes`` the output width (TFF's task: 100);
* every initializer is seeded from ``seed`` (TFF's are unseeded);
* the regularizers' penalty is in ``model.losses``, which TFF's training adds
  to the loss; fedsim's trainers minimise the spec's per-example loss only, so
  as of this writing the L2 term is NOT applied in fedsim (``weight_decay=0``
  builds the model without regularizers);
* ``groups``, ``repetitions`` and ``initial_filters`` are keyword arguments
  (TFF: 32, Keras' default, and ResNet-18's (2, 2, 2, 2) and 64), so smaller
  variants can be built; ``groups`` must divide every stage's filters.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import tensorflow as tf

from fedsim.models._seeded import Seeds, check_positive, check_shape


def build(input_shape: Sequence[int], num_classes: int, seed: int, *,
          repetitions: Sequence[int] = (2, 2, 2, 2), initial_filters: int = 64,
          initial_strides: Sequence[int] = (2, 2), initial_kernel_size: Sequence[int] = (7, 7),
          initial_max_pooling: bool = True, groups: int = 32,
          weight_decay: float = 1e-4) -> tf.keras.Model:
    """ResNet-18 (GroupNorm) for images of ``input_shape`` (height, width,
    channels), ``num_classes`` logits out. The keyword arguments are
    ``create_resnet``'s, with ResNet-18's values; ``groups`` is the
    GroupNormalization groups, ``weight_decay`` the L2 factor (0: none)."""
    shape = check_shape(input_shape, 3, "(height, width, channels)", "resnet_gn")
    reps = tuple(int(r) for r in repetitions)
    check_positive(num_classes=num_classes, initial_filters=initial_filters, groups=groups,
                   **{f"repetitions[{i}]": r for i, r in enumerate(reps)})
    if not reps:
        raise ValueError("repetitions must not be empty")
    for i in range(len(reps)):
        if (int(initial_filters) << i) % int(groups):
            raise ValueError(f"groups={groups} must divide every stage's filters "
                             f"({int(initial_filters) << i} in stage {i})")
    seeds = Seeds(seed)

    def l2() -> Optional[Any]:
        return tf.keras.regularizers.l2(float(weight_decay)) if weight_decay else None

    def norm(x: Any) -> Any:
        return tf.keras.layers.GroupNormalization(groups=int(groups), axis=-1)(x)

    def norm_relu(x: Any) -> Any:
        return tf.keras.layers.Activation("relu")(norm(x))

    def conv(x: Any, filters: int, kernel_size: Sequence[int],
             strides: Sequence[int] = (1, 1), padding: str = "same") -> Any:
        return tf.keras.layers.Conv2D(filters, tuple(kernel_size), strides=tuple(strides),
                                      padding=padding, use_bias=False,
                                      kernel_initializer=seeds.he_normal(),
                                      kernel_regularizer=l2())(x)

    def shortcut(block_input: Any, residual: Any) -> Any:
        in_shape = tf.keras.backend.int_shape(block_input)
        res_shape = tf.keras.backend.int_shape(residual)
        stride_width = int(round(in_shape[1] / res_shape[1]))
        stride_height = int(round(in_shape[2] / res_shape[2]))
        out = block_input
        if stride_width > 1 or stride_height > 1 or in_shape[-1] != res_shape[-1]:
            out = conv(out, res_shape[-1], (1, 1), strides=(stride_width, stride_height),
                       padding="valid")
            out = norm(out)
        return tf.keras.layers.add([out, residual])

    def basic_block(x: Any, filters: int, normalize_first: bool) -> Any:
        h = conv(norm_relu(x) if normalize_first else x, filters, (3, 3))
        h = conv(norm_relu(h), filters, (3, 3))
        return shortcut(x, h)

    inputs = tf.keras.Input(shape=shape)
    x = norm_relu(conv(inputs, int(initial_filters), initial_kernel_size,
                       strides=initial_strides))
    if initial_max_pooling:
        x = tf.keras.layers.MaxPooling2D(pool_size=(3, 3), strides=tuple(initial_strides),
                                         padding="same")(x)
    filters = int(initial_filters)
    for stage, blocks in enumerate(reps):
        for i in range(blocks):
            x = basic_block(x, filters, normalize_first=not (stage == 0 and i == 0))
        filters *= 2
    x = norm_relu(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    logits = tf.keras.layers.Dense(int(num_classes),
                                   kernel_initializer=seeds.random_normal(0.01),
                                   kernel_regularizer=l2(), bias_regularizer=l2())(x)
    return tf.keras.Model(inputs, logits, name="resnet_gn")

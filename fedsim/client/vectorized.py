"""Many virtual clients trained in ONE compiled call: the vectorized ``client_update``.

:class:`fedsim.client.local.LocalTrainer` runs one client's SGD steps per call; with
batches of 10 examples each step is a few tiny matmuls, and a 2-core machine
spends most of its time dispatching ops. :class:`VectorizedTrainer` trains K
clients at once: their copies of the conv kernels and of all biases are stacked
along a leading client axis (a variable of shape ``s`` becomes ``(K, *s)``), the
dense kernels are kept in factored form, and every SGD step of all K clients is
one set of batched ops:

* dense layers (``dense="factored"``): no client's copy of the kernel is formed.
  SGD changes a kernel by ``-H_t^T G_t`` per step (the layer's inputs and the
  gradient with respect to its outputs), so the K clients' outputs at a step
  are ONE matmul of all their inputs with the shared global kernel plus a
  correction through the Gram matrices of each client's own examples
  (:meth:`VectorizedTrainer._train_factored`); the work per step is that of
  the global model at batch K * B, plus terms that grow with the examples a
  client has seen. ``dense="stacked"`` stacks the kernels, ``(K, in, out)``,
  and runs batched matmuls, ``einsum('kbi,kio->kbo')``: every client's copy is
  read and written at every step, which bounds it by memory traffic.
  ``dense="auto"`` (default) factors a call whose clients see at most
  :attr:`VectorizedTrainer.factored_max_slots` examples (steps x batch size):
  beyond it the factored form's corrections cost more than forming the
  kernels. A larger call is stacked, unless the model has no convolution and
  its dense kernels hold more than :data:`STACKED_MAX_KERNEL_FLOATS` weights:
  then every client's copy read and written at every step costs more than the
  per-step dispatch that stacking saves, and the clients are trained one at a
  time (LocalTrainer's graph on each client's own drawn order);
* conv layers (``conv="grouped"``, the default): ONE grouped convolution, the K
  clients being K channel groups of a ``(B, H, W, K*C)`` tensor and their
  kernels the groups of a ``(3, 3, C, K*O)`` filter (``feature_group_count`` =
  K; TF 2.14 runs it, forward and backward, on CPU through oneDNN). Bias, ReLU
  and max pooling act per channel, so they run on that layout unchanged.
  ``conv="vmap"`` instead runs a per-client functional forward pass under
  ``tf.vectorized_map`` (with stacked dense kernels; kept for comparison).

The mathematics is exactly each client's own: client k's loss depends only on
its weights and its batch, so the gradient of the sum of the clients' losses
with respect to the stacked weights is, slice by slice, each client's gradient.

Clients may hold different numbers of examples, hence different numbers of
steps and short last batches. A call pads every client to the longest client's
step count and to ``batch_size`` examples per step:

* each (client, step, slot) carries an example weight, ``1 / count`` for the
  ``count`` real examples of that step's batch and ``0`` for padding, so the
  loss of a step is the mean over its real examples, as in LocalTrainer;
* each (client, step) carries an active flag; on inactive (padding) steps the
  gradient is exactly zero and, with momentum, the weights are left as they are
  (``tf.where``), so padding steps are no-ops.

Shuffling is :func:`fedsim.client.local.epoch_order` with the client's own ``rng``,
batches are cut exactly as LocalTrainer cuts them (``ceil(n / batch_size)``
steps per epoch, the last one short), so ``train_many(w, [(x, y, rng), ...])``
equals ``[LocalTrainer.train(w, x, y, rng), ...]`` up to float rounding (the
order of floating-point sums differs). The flat weight layout is
:class:`fedsim.models.keras.FlatWeights`'s, so deltas are interchangeable.

One ``tf.function`` per dense layout serves every call: the client count K,
the step count and the number of examples are ``None`` dimensions of its input
signature, so it is traced once. Clients are sorted by size and trained in
chunks of at most ``max_clients_per_call`` (similar sizes share a chunk, so
little is padded); results come back in the caller's order. Results are
bit-for-bit repeatable for the same chunks; a different chunk composition (e.g.
another worker count) can change the last bits.

Speed: ``benchmarks/vectorized_micro.py`` measures this trainer against
LocalTrainer and the roofline (the model at batch 1,000) outside Ray, and
``benchmarks/compare_simulators.py`` inside fedsim; README ("compare_simulators")
has the numbers. What stacking buys a CNN on one core is little (its batch-10
convolutions are already compute-bound); the factored dense layers are what
make a dense model's many small steps cost about what the global model's big
ones do. XLA (``jit_compile``) is not used: it needs a fixed shape per
compilation and ran the grouped convolution far slower on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from fedsim.client.local import ClientResult, LocalTrainer, SignatureGraph, epoch_order
from fedsim.config import ClientConfig
from fedsim.errors import ConfigError
from fedsim.models.keras import FlatWeights
from fedsim.models.spec import ModelSpec

CONV_BACKENDS = ("grouped", "vmap")
DENSE_BACKENDS = ("auto", "factored", "stacked")
FACTORED_MAX_SLOTS = 512
"""``dense="auto"``: never factored beyond this many example slots (steps x batch
size) per client (the factored form's memory grows with the square of the
slots); :attr:`VectorizedTrainer.factored_max_slots` may set a lower bound."""

STACKED_MAX_KERNEL_FLOATS = 1 << 15
"""``dense="auto"``: a model without convolutions whose dense kernels hold more
weights than this trains a call beyond the factored limit one client at a time
rather than stacked (``benchmarks/vectorized_micro.py --examples`` measures
where the two cross)."""


def factored_slot_limit(kernels: Sequence[tuple[int, int]]) -> int:
    """The example slots per client up to which factored dense layers are cheaper
    than formed ones, for dense kernels of shapes ``(in, out)``: per step and
    example a formed kernel costs ``sum(in * out)`` multiply-adds, the factored
    correction ``slots * sum(in + out)``. Capped by :data:`FACTORED_MAX_SLOTS`;
    0 when the model has no dense layer."""
    if not kernels:
        return 0
    direct = sum(i * o for i, o in kernels)
    per_slot = sum(i + o for i, o in kernels)
    return min(FACTORED_MAX_SLOTS, direct // per_slot)


@dataclass(frozen=True)
class _Layer:
    """One Keras layer of the model, as the functional forward pass needs it."""

    kind: str  # conv, pool, flatten, dense
    relu: bool = False
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"
    pool_size: tuple[int, int] = (1, 1)


SUPPORTED = ("Dense (with bias), Conv2D (channels_last, with bias, no dilation or groups), "
             "MaxPool2D and Flatten, activations relu or linear, in a Sequential or "
             "single-chain functional model")
"""What :class:`VectorizedTrainer` can run: the layers it implements itself."""


def _describe(model: tf.keras.Model) -> list[_Layer]:
    """The model's layers as :class:`_Layer` records; refuses what is not supported
    (NotImplementedError): the layers are run one after another in
    ``model.layers`` order, so the model must be a Sequential or a functional
    model (a subclassed model's ``call`` may do anything)."""
    if not (isinstance(model, tf.keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise NotImplementedError(f"vectorized training: subclassed model "
                                  f"{type(model).__name__}")
    layers: list[_Layer] = []
    ordered: list[tf.Variable] = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.InputLayer):
            continue
        act = getattr(layer, "activation", None)
        relu = act is tf.keras.activations.relu
        if act is not None and not relu and act is not tf.keras.activations.linear:
            raise NotImplementedError(f"vectorized training: activation {act.__name__} "
                                      f"of layer {layer.name}")
        if isinstance(layer, tf.keras.layers.Conv2D) and type(layer) is tf.keras.layers.Conv2D:
            if (tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1 or not layer.use_bias
                    or layer.data_format != "channels_last"):
                raise NotImplementedError(f"vectorized training: conv layer {layer.name}")
            layers.append(_Layer("conv", relu, tuple(layer.strides), layer.padding.upper()))
        elif isinstance(layer, tf.keras.layers.MaxPool2D):
            layers.append(_Layer("pool", strides=tuple(layer.strides),
                                 padding=layer.padding.upper(),
                                 pool_size=tuple(layer.pool_size)))
        elif isinstance(layer, tf.keras.layers.Flatten):
            layers.append(_Layer("flatten"))
        elif isinstance(layer, tf.keras.layers.Dense):
            if not layer.use_bias:
                raise NotImplementedError(f"vectorized training: dense layer {layer.name}")
            layers.append(_Layer("dense", relu))
        else:
            raise NotImplementedError(f"vectorized training: layer {type(layer).__name__}")
        ordered.extend(layer.trainable_variables)
    if [id(v) for v in ordered] != [id(v) for v in model.trainable_variables]:
        raise NotImplementedError("vectorized training: unexpected variable order")
    return layers


def _momentum_step(params: list[tf.Tensor], steps: list[tf.Tensor],
                   velocity: list[tf.Tensor], on: tf.Tensor, momentum: float,
                   ) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """One heavy-ball step of K stacked clients, as (params, velocity). ``steps`` are
    already lr * g and ``velocity`` is u = lr * v: u <- m * u + lr * g; w <- w - u
    (LocalTrainer's v <- m * v + g; w <- w - lr * v, scaled). Clients with ``on``
    False (their padding steps, which come after their last real one, so their
    velocity no longer matters) keep their weights."""
    new_params, new_velocity = [], []
    for p, g, u in zip(params, steps, velocity):
        mask = tf.reshape(on, [-1] + [1] * (len(p.shape) - 1))
        u_next = momentum * u + g
        new_velocity.append(u_next)
        new_params.append(tf.where(mask, p - u_next, p))
    return new_params, new_velocity


def batch_plan(sizes: Sequence[int], batch_size: int, local_epochs: int,
               orders: Sequence[np.ndarray], offsets: Sequence[int] | np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather indices, example weights and step flags for clients of ``sizes``.

    Client k's examples are rows ``offsets[k] .. offsets[k] + sizes[k] - 1`` of the
    concatenated data and ``orders[k]`` its :func:`epoch_order`. Returns
    ``idx`` int32 ``(K, S, B)`` (rows into the concatenated data; padding points
    at row 0), ``weights`` float32 ``(K, S, B)`` (``1 / count`` for the ``count``
    examples of a step's batch, 0 for padding) and ``active`` float32 ``(K, S)``,
    with S the largest step count. Batches are cut as LocalTrainer cuts them.
    """
    bs = int(batch_size)
    steps = [local_epochs * (-(-n // bs)) for n in sizes]
    k, s = len(sizes), max(steps, default=0)
    idx = np.zeros((k, s, bs), np.int32)
    weights = np.zeros((k, s, bs), np.float32)
    active = np.zeros((k, s), np.float32)
    for c, (n, order, off) in enumerate(zip(sizes, orders, offsets)):
        if n == 0:
            continue
        spe = -(-n // bs)
        # Pad each epoch's permutation to spe * bs slots: the last batch is short.
        padded = np.full((local_epochs, spe * bs), -1, np.int64)
        padded[:, :n] = np.asarray(order, np.int64).reshape(local_epochs, n)
        padded = padded.reshape(local_epochs * spe, bs)
        valid = padded >= 0
        counts = valid.sum(axis=1, keepdims=True)
        idx[c, :len(padded)] = np.where(valid, padded + off, 0)
        weights[c, :len(padded)] = np.where(valid, 1.0 / counts, 0.0)
        active[c, :len(padded)] = 1.0
    return idx, weights, active


class VectorizedTrainer:
    """Trains many clients of one architecture at once; same results as LocalTrainer.

    Same constructor as :class:`fedsim.client.local.LocalTrainer` (a ModelSpec
    whose model has only the layers of :data:`SUPPORTED`: :func:`check_vectorizable`;
    its loss is applied to the K clients' batches flattened to one batch of
    K * B examples, so any per-example loss works), plus:

    max_clients_per_call: clients per compiled call (K); more clients are
      trained in several calls. Memory grows as K x (stacked parameters +
      activations of one batch + the factored dense layers' kept inputs and
      output gradients, ``steps * batch_size * (in + out)`` floats per layer).
    conv: ``grouped`` (grouped convolution) or ``vmap`` (``tf.vectorized_map``).
    dense: ``auto``, ``factored`` or ``stacked`` (the module docstring).
    """

    def __init__(self, model: ModelSpec, client_cfg: ClientConfig,
                 input_shape: Sequence[int], num_classes: int, batch_size: int,
                 local_epochs: int, seed: int = 0, max_clients_per_call: int = 16,
                 conv: str = "grouped", dense: str = "auto") -> None:
        if getattr(client_cfg, "optimizer", "sgd") != "sgd":
            raise NotImplementedError(
                f"vectorized training: client.optimizer={client_cfg.optimizer} (sgd only)")
        if conv not in CONV_BACKENDS:
            raise ValueError(f"conv must be one of {CONV_BACKENDS}, not {conv!r}")
        if dense not in DENSE_BACKENDS:
            raise ValueError(f"dense must be one of {DENSE_BACKENDS}, not {dense!r}")
        if max_clients_per_call < 1:
            raise ValueError("max_clients_per_call must be >= 1")
        self.spec = model
        self.model = model.build(input_shape, num_classes, seed)
        self.num_classes = int(num_classes)
        self.flat = FlatWeights(self.model.trainable_variables)
        self.layers = _describe(self.model)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.batch_size = int(batch_size)
        self.local_epochs = int(local_epochs)
        self.max_clients_per_call = int(max_clients_per_call)
        self.conv = conv
        self.dense = dense
        self._lr = tf.constant(client_cfg.learning_rate, tf.float32)
        self._momentum = tf.constant(client_cfg.momentum, tf.float32)
        self._use_momentum = client_cfg.momentum > 0
        bs = self.batch_size
        signature = [
            tf.TensorSpec([None], tf.float32),                       # global weights
            tf.TensorSpec([None, *self.input_shape], tf.float32),    # x of the chunk
            tf.TensorSpec([None], tf.int32),                         # y of the chunk
            tf.TensorSpec([None, None, bs], tf.int32),               # idx (K, S, B)
            tf.TensorSpec([None, None, bs], tf.float32),             # example weights
            tf.TensorSpec([None, None], tf.float32),                 # active (K, S)
            tf.TensorSpec([None], tf.float32),                       # examples seen (K,)
        ]
        # The factored graph (``_train``) and the stacked one, each traced on first
        # use. (conv="vmap" maps one client's whole forward pass: stacked kernels.)
        if conv == "vmap" or dense == "stacked":
            self.dense = "stacked"
        self._train = SignatureGraph(self._train_factored, signature)
        self._train_stacked = SignatureGraph(self._train_graph, signature)
        kernels = [(int(v.shape[0]), int(v.shape[1])) for v in self.model.trainable_variables
                   if len(v.shape) == 2]
        self.factored_max_slots = factored_slot_limit(kernels)
        """``dense="auto"``: a call is factored while its clients see at most this
        many example slots (:func:`factored_slot_limit` of the dense kernels)."""
        self.stack_long_clients = (any(layer.kind == "conv" for layer in self.layers)
                                   or sum(i * o for i, o in kernels)
                                   <= STACKED_MAX_KERNEL_FLOATS)
        """``dense="auto"``: a call beyond :attr:`factored_max_slots` is stacked
        (True) or trained one client at a time (False; see the module docstring)."""
        self._client_cfg = client_cfg
        self._seed = seed
        self._one_at_a_time: LocalTrainer | None = None  # dense="auto", built on first use

    @property
    def num_parameters(self) -> int:
        return self.flat.size

    # -- the functional model over stacked weights --------------------------------
    def _forward(self, params: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """Logits ``(K, B, classes)`` of K clients on their batches ``x`` ``(K, B, ...)``."""
        if self.conv == "vmap" and any(layer.kind == "conv" for layer in self.layers):
            return tf.vectorized_map(lambda a: self._forward_one(a[0], a[1]),
                                     (list(params), x))
        k = tf.shape(params[0])[0]
        h, grouped, it = x, False, iter(params)
        for layer in self.layers:
            if layer.kind == "dense":
                kernel, bias = next(it), next(it)
                h = tf.einsum("kbi,kio->kbo", h, kernel) + bias[:, None, :]
            else:
                h, grouped = self._stacked_layer(layer, h, it, grouped, k)
            if layer.relu:
                h = tf.nn.relu(h)
        return h

    def _forward_one(self, params: Sequence[tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """One client's logits ``(B, classes)`` (the body of ``conv="vmap"``)."""
        h, i = x, 0
        for layer in self.layers:
            if layer.kind == "conv":
                h = tf.nn.bias_add(tf.nn.conv2d(h, params[i], layer.strides, layer.padding),
                                   params[i + 1])
                i += 2
            elif layer.kind == "pool":
                h = tf.nn.max_pool2d(h, layer.pool_size, layer.strides, layer.padding)
            elif layer.kind == "flatten":
                h = tf.reshape(h, [tf.shape(h)[0], -1])
            elif layer.kind == "dense":
                h = tf.matmul(h, params[i]) + params[i + 1]
                i += 2
            if layer.relu:
                h = tf.nn.relu(h)
        return h

    def _losses(self, y: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        """The spec's per-example loss of K clients' batches: ``(K, B)`` from labels
        ``(K, B)`` and logits ``(K, B, classes)``, computed as one batch of K * B."""
        flat = self.spec.loss(tf.reshape(y, [-1]),
                              tf.reshape(logits, [-1, tf.shape(logits)[-1]]))
        return tf.reshape(flat, tf.shape(y))

    # -- the compiled training loop -----------------------------------------------
    def _train_graph(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor, idx: tf.Tensor,
                     weights: tf.Tensor, active: tf.Tensor,
                     seen: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        k = tf.shape(idx)[0]
        num_steps = tf.shape(idx)[1]
        params = [tf.tile(tf.reshape(p, [1, *s]), [k] + [1] * len(s))
                  for p, s in zip(tf.split(global_flat, self.flat.sizes), self.flat.shapes)]
        velocity = [tf.zeros_like(p) for p in params]
        total_loss = tf.zeros([k], tf.float32)
        momentum = self._momentum
        for step in tf.range(num_steps):
            rows = idx[:, step]                                   # (K, B)
            w = weights[:, step]                                  # (K, B): 1/count or 0
            xb = tf.gather(x, rows)                               # (K, B, ...)
            yb = tf.gather(y, rows)
            with tf.GradientTape() as tape:
                tape.watch(params)
                logits = self._forward(params, xb)
                ce = self._losses(yb, logits)                     # (K, B)
                # lr * (sum over clients of their mean losses): the gradient is then
                # already the SGD step lr * g, which saves a pass over K x params.
                objective = tf.reduce_sum(ce * (w * self._lr))
            steps = tape.gradient(objective, params)
            total_loss += tf.reduce_sum(tf.where(w > 0, ce, 0.0), axis=1)
            if self._use_momentum:
                params, velocity = _momentum_step(params, steps, velocity,
                                                  active[:, step] > 0, momentum)
            else:  # padding steps have all-zero example weights, hence zero gradients
                params = [p - g for p, g in zip(params, steps)]
        local = tf.concat([tf.reshape(p, [k, -1]) for p in params], axis=1)
        delta = global_flat[None, :] - local
        return delta, total_loss / tf.maximum(seen, 1.0)

    # -- the factored dense layers ------------------------------------------------------
    def _momentum_coefficients(self, num_steps: tf.Tensor) -> tf.Tensor:
        """``C`` ``(S + 1, S)``: after ``s`` SGD steps a dense kernel is
        ``W0 - sum_{t < s} C[s, t] H_t^T G_t`` (``G_t`` the step-``t`` gradient of
        the objective with respect to the layer's outputs, ``H_t`` its inputs);
        ``C[s, t] = sum_{j=t}^{s-1} m^(j-t)`` with momentum m (1 without)."""
        s = tf.range(num_steps + 1)[:, None]
        t = tf.range(num_steps)[None, :]
        past = s > t
        if not self._use_momentum:
            return tf.cast(past, tf.float32)
        d = tf.cast(tf.maximum(s - t, 0), tf.float32)
        m = self._momentum
        return tf.where(past, (1.0 - tf.pow(m, d)) / (1.0 - m), 0.0)

    def _train_factored(self, global_flat: tf.Tensor, x: tf.Tensor, y: tf.Tensor,
                        idx: tf.Tensor, weights: tf.Tensor, active: tf.Tensor,
                        seen: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """:meth:`_train_graph` with every dense kernel kept in factored form.

        SGD changes a dense kernel by ``-H_t^T G_t`` at step t (``H_t`` the
        layer's inputs ``(B, in)``, ``G_t`` the gradient of the step's objective,
        learning rate included, with respect to the layer's outputs ``(B, out)``),
        so client k's kernel after s steps is ``W0 - sum_{t<s} c_st H_t^T G_t``
        (``c_st``: :meth:`_momentum_coefficients`) and its outputs at step s are

            H_s W_s = H_s W0 - sum_{t<s} c_st (H_s H_t^T) G_t:

        ONE matmul of all K clients' inputs with the shared global kernel
        ``(K*B, in) x (in, out)`` plus a correction through the small Gram
        matrices ``H_s H_t^T`` of the client's own examples. No client's copy of
        the kernel is ever formed; at the end its update
        ``W0 - W = sum_t c_t H_t^T G_t`` is one batched matmul. The same
        mathematics as the stacked kernels (up to float rounding). Conv kernels
        and all biases stay stacked. The inputs and output gradients of every
        step are kept: ``(K, S*B, in + out)`` floats per dense layer. When the
        model's first parametric layer is a dense layer on the (flattened) input,
        its inputs are known before the first step: ``H W0`` of all steps and
        the Gram matrices are computed at once before the loop.
        """
        bs = self.batch_size
        k = tf.shape(idx)[0]
        num_steps = tf.shape(idx)[1]
        slots = num_steps * bs
        shared = [tf.reshape(p, s) for p, s in zip(tf.split(global_flat, self.flat.sizes),
                                                    self.flat.shapes)]
        # Parameter positions: dense kernels (factored) and the rest (stacked).
        kernel_at: dict[int, int] = {}  # param index -> dense layer number
        i = 0
        for layer in self.layers:
            if layer.kind in ("conv", "dense"):
                if layer.kind == "dense":
                    kernel_at[i] = len(kernel_at)
                i += 2
        stacked_ids = [j for j in range(len(shared)) if j not in kernel_at]
        stacked = [tf.tile(shared[j][None], [k] + [1] * len(shared[j].shape))
                   for j in stacked_ids]
        velocity = [tf.zeros_like(p) for p in stacked]
        kernels = [shared[j] for j in sorted(kernel_at)]
        coeffs = self._momentum_coefficients(num_steps)               # (S + 1, S)
        first = next(n for n, layer in enumerate(self.layers) if layer.kind != "flatten")
        pre = self.layers[first].kind == "dense"  # the first dense layer sees the input
        h_buf = [tf.zeros([k, slots, kern.shape[0]]) for kern in kernels]
        g_buf = [tf.zeros([k, slots, kern.shape[1]]) for kern in kernels]
        if pre:
            x0 = tf.reshape(tf.gather(x, tf.reshape(idx, [k, slots])), [k, slots, -1])
            h_buf[0] = x0
            xw0 = tf.reshape(tf.matmul(tf.reshape(x0, [k * slots, -1]), kernels[0]),
                             [k, slots, -1])
            gram0 = tf.matmul(x0, x0, transpose_b=True)                # (K, SB, SB)
        rows_k = tf.tile(tf.range(k)[:, None], [1, bs])               # (K, B)
        total_loss = tf.zeros([k], tf.float32)
        momentum = self._momentum
        for step in tf.range(num_steps):
            rows = idx[:, step]
            w = weights[:, step]
            yb = tf.gather(y, rows)
            lo = step * bs
            coef = tf.repeat(coeffs[step], bs)                        # (SB,)
            scatter_at = tf.stack([rows_k, lo + tf.tile(tf.range(bs)[None], [k, 1])], -1)
            with tf.GradientTape() as tape:
                tape.watch(stacked)
                outs, ins = [], []
                h = None if pre else tf.gather(x, rows)
                p, d, grouped = iter(stacked), 0, False
                for n, layer in enumerate(self.layers):
                    if layer.kind == "dense":
                        bias = next(p)
                        if pre and d == 0:
                            z = xw0[:, lo:lo + bs]
                            gram = gram0[:, lo:lo + bs]
                        else:
                            h = tf.reshape(h, [k, bs, -1])
                            ins.append(h)
                            z = tf.reshape(tf.matmul(tf.reshape(h, [k * bs, -1]), kernels[d]),
                                           [k, bs, -1])
                            gram = tf.matmul(h, tf.stop_gradient(h_buf[d]), transpose_b=True)
                        z = z - tf.matmul(gram * coef, g_buf[d])
                        tape.watch(z)  # (it may not depend on any watched tensor)
                        outs.append(z)
                        h = z + bias[:, None, :]
                        d += 1
                    elif n < first:  # flatten of the raw input: done in x0
                        continue
                    else:
                        h, grouped = self._stacked_layer(layer, h, p, grouped, k)
                    if layer.relu:
                        h = tf.nn.relu(h)
                ce = self._losses(yb, h)                              # (K, B)
                objective = tf.reduce_sum(ce * (w * self._lr))
            grads = tape.gradient(objective, stacked + outs)
            steps, g_out = grads[:len(stacked)], grads[len(stacked):]
            total_loss += tf.reduce_sum(tf.where(w > 0, ce, 0.0), axis=1)
            offset = 1 if pre else 0
            g_buf = [tf.tensor_scatter_nd_update(buf, scatter_at, g)
                     for buf, g in zip(g_buf, g_out)]
            h_buf = h_buf[:offset] + [tf.tensor_scatter_nd_update(buf, scatter_at, hin)
                                      for buf, hin in zip(h_buf[offset:], ins)]
            if self._use_momentum:
                stacked, velocity = _momentum_step(stacked, steps, velocity,
                                                   active[:, step] > 0, momentum)
            else:
                stacked = [q - g for q, g in zip(stacked, steps)]
        done = tf.cast(tf.reduce_sum(active, axis=1), tf.int32)      # real steps per client
        final = tf.repeat(tf.gather(coeffs, done), bs, axis=1)[:, :, None]  # (K, SB, 1)
        deltas: dict[int, tf.Tensor] = {}
        for j, q in zip(stacked_ids, stacked):
            deltas[j] = tf.reshape(shared[j][None] - q, [k, -1])
        for j, d in kernel_at.items():
            deltas[j] = tf.reshape(tf.matmul(h_buf[d], g_buf[d] * final, transpose_a=True),
                                   [k, -1])
        delta = tf.concat([deltas[j] for j in range(len(shared))], axis=1)
        return delta, total_loss / tf.maximum(seen, 1.0)

    def _stacked_layer(self, layer: _Layer, h: tf.Tensor, params: Iterable[tf.Tensor],
                       grouped: bool, k: tf.Tensor) -> tuple[tf.Tensor, bool]:
        """One conv, pool or flatten layer of :meth:`_forward` (grouped convolution)
        on stacked inputs; ``params`` yields the conv's stacked kernel and bias."""
        bs = self.batch_size
        it = iter(params)
        if layer.kind == "conv":
            kernel, bias = next(it), next(it)
            if not grouped:  # (K, B, H, W, C) -> (B, H, W, K*C)
                shape = tf.shape(h)
                h = tf.transpose(h, [1, 2, 3, 0, 4])
                h = tf.reshape(h, [bs, shape[2], shape[3], -1])
                grouped = True
            kh, kw, cin = kernel.shape[1:4]
            filt = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]), [kh, kw, cin, -1])
            h = tf.nn.conv2d(h, filt, layer.strides, layer.padding)
            h = tf.nn.bias_add(h, tf.reshape(bias, [-1]))
        elif layer.kind == "pool":
            if grouped:
                h = tf.nn.max_pool2d(h, layer.pool_size, layer.strides, layer.padding)
            else:
                shape = tf.shape(h)
                flat = tf.reshape(h, tf.concat([[-1], shape[2:]], 0))
                flat = tf.nn.max_pool2d(flat, layer.pool_size, layer.strides, layer.padding)
                h = tf.reshape(flat, tf.concat([shape[:2], tf.shape(flat)[1:]], 0))
        elif layer.kind == "flatten":
            if grouped:  # (B, H, W, K*C) -> (K, B, H*W*C), row-major like Keras
                shape = tf.shape(h)
                h = tf.reshape(h, [bs, shape[1], shape[2], k, -1])
                h = tf.transpose(h, [3, 0, 1, 2, 4])
                h = tf.reshape(h, [k, bs, -1])
                grouped = False
            else:
                shape = tf.shape(h)
                h = tf.reshape(h, [shape[0], shape[1], -1])
        return h, grouped

    # -- Python API -----------------------------------------------------------------
    def train_many(self, global_weights: np.ndarray,
                   clients: Iterable[tuple[np.ndarray, np.ndarray, np.random.Generator]]
                   ) -> list[ClientResult]:
        """Train every ``(x, y, rng)`` from ``global_weights``; results in input order.

        Client i's result equals ``LocalTrainer.train(global_weights, x, y, rng)``
        (same shuffling, batches, steps and loss) up to float rounding.
        """
        clients = list(clients)
        # Draw every client's shuffling first, in input order (rngs may be shared).
        orders = [epoch_order(len(x), self.local_epochs, rng) for x, _, rng in clients]
        sizes = [len(x) for x, _, _ in clients]
        by_size = sorted(range(len(clients)), key=lambda i: -sizes[i])
        results: list[ClientResult | None] = [None] * len(clients)
        gw = np.asarray(global_weights, np.float32)
        for start in range(0, len(by_size), self.max_clients_per_call):
            chunk = by_size[start:start + self.max_clients_per_call]
            for i, res in zip(chunk, self._train_chunk(gw, [clients[i] for i in chunk],
                                                       [orders[i] for i in chunk])):
                results[i] = res
        return results  # type: ignore[return-value]

    def train(self, global_weights: np.ndarray, x: np.ndarray, y: np.ndarray,
              rng: np.random.Generator) -> ClientResult:
        """One client (LocalTrainer's signature)."""
        return self.train_many(global_weights, [(x, y, rng)])[0]

    def _train_chunk(self, gw: np.ndarray, clients: Sequence[tuple], orders: Sequence[np.ndarray]
                     ) -> list[ClientResult]:
        sizes = [len(x) for x, _, _ in clients]
        if sum(sizes) == 0:
            return [ClientResult(np.zeros_like(gw), 0, 0.0) for _ in clients]
        # The longest client's example slots (batch_plan's steps x batch size),
        # decided before any of the chunk's data is gathered.
        slots = self.local_epochs * -(-max(sizes) // self.batch_size) * self.batch_size
        factored = self.dense == "factored" or (
            self.dense == "auto" and slots <= self.factored_max_slots)
        if self.dense == "auto" and not factored and not self.stack_long_clients:
            return self._train_one_at_a_time(gw, clients, orders)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        idx, weights, active = batch_plan(sizes, self.batch_size, self.local_epochs, orders,
                                          offsets)
        x = np.concatenate([np.asarray(c[0], np.float32).reshape(-1, *self.input_shape)
                            for c in clients])
        y = np.concatenate([np.asarray(c[1], np.int32).reshape(-1) for c in clients])
        seen = np.asarray(sizes, np.float32) * self.local_epochs
        train = self._train if factored else self._train_stacked
        delta, loss = train(gw, x, y, idx, weights, active, seen)
        # A read-only view of the tensor's buffer (``.numpy()`` would copy all
        # K x P floats); each client's delta is a row of it.
        delta, loss = np.asarray(delta), loss.numpy()
        return [ClientResult(delta=delta[i], num_examples=int(n), loss=float(loss[i]))
                for i, n in enumerate(sizes)]

    def _train_one_at_a_time(self, gw: np.ndarray, clients: Sequence[tuple],
                             orders: Sequence[np.ndarray]) -> list[ClientResult]:
        """Each client by LocalTrainer's graph, in its already drawn order."""
        if self._one_at_a_time is None:
            self._one_at_a_time = LocalTrainer(
                self.spec, self._client_cfg, self.input_shape, self.num_classes,
                self.batch_size, self.local_epochs, self._seed)
        return [self._one_at_a_time.train_in_order(gw, x, y, order)
                for (x, y, _), order in zip(clients, orders)]


def check_vectorizable(model: ModelSpec, input_shape: Sequence[int], num_classes: int,
                       seed: int, batch_size: int, vectorize: int, conv: str = "grouped"
                       ) -> None:
    """Refuse, before any actor starts, a model :class:`VectorizedTrainer` cannot run
    (one-line ConfigError naming ``client.vectorize``): one with a layer outside
    :data:`SUPPORTED`, a subclassed model, or one whose vectorized forward pass
    (two clients' stacked copies of the weights) does not reproduce the Keras
    model's logits."""
    try:
        trainer = VectorizedTrainer(model, ClientConfig(), input_shape, num_classes,
                                    batch_size, 1, seed, max_clients_per_call=2, conv=conv)
    except NotImplementedError as err:
        raise ConfigError("client.vectorize", f"0 or 1 with model {model.name} ({err}; "
                          f"vectorized training supports {SUPPORTED})", vectorize) from err
    rng = np.random.default_rng(seed)
    x = rng.random((2, trainer.batch_size, *trainer.input_shape)).astype(np.float32)
    params = [tf.stack([v, v * 0.5]) for v in trainer.model.trainable_variables]
    got = trainer._forward(params, tf.constant(x)).numpy()
    want0 = trainer.model(x[0], training=False).numpy()
    for v, p in zip(trainer.model.trainable_variables, params):
        v.assign(p[1])
    want1 = trainer.model(x[1], training=False).numpy()
    if not (np.allclose(got[0], want0, rtol=1e-4, atol=1e-5)
            and np.allclose(got[1], want1, rtol=1e-4, atol=1e-5)):
        raise ConfigError("client.vectorize", f"0 or 1 with model {model.name} (its layers, "
                          "run one after another as vectorized training runs them, do not "
                          f"compute the model's logits; vectorized training supports "
                          f"{SUPPORTED})", vectorize)

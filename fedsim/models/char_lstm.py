"""The character LSTM of Reddi et al. (ICLR 2021) for Shakespeare next-character
prediction: TFF 0.87's
``tff.simulation.baselines.shakespeare.char_prediction_models.create_recurrent_model``
(the model of McMahan et al., AISTATS 2017).

Layers, exactly as TFF's::

    Embedding(vocab, 8, mask_zero=True)
    -> LSTM(256, return_sequences) -> LSTM(256, return_sequences)
    -> Dense(vocab)

LSTM kernels He-normal (TFF's ``kernel_initializer='he_normal'``), recurrent
kernels orthogonal, biases zero with unit forget bias (Keras' defaults), the
embedding U(-0.05, 0.05) and the Dense Glorot-uniform (Keras' defaults). With
TFF's vocabulary (86 characters + 4 special tokens = 90) it has 820,522
parameters. Inputs are int32 token ids ``[batch, T]``, outputs logits
``[batch, T, vocab]`` (TFF's model outputs logits too). With ``mask_zero``,
id 0 (padding) is masked: the LSTMs skip those steps (carrying their state
over them), so padding does not change the outputs at the other positions.

Deliberate differences: the vocabulary is ``num_classes`` and ``T`` is
``input_shape[0]``; TFF's fixed sizes (8, 256, two layers) are the defaults of
``embedding_size``, ``lstm_size`` and ``num_lstm_layers``; every initializer is
seeded from ``seed`` (TFF's are unseeded).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from fedsim.models._seeded import Seeds, check_positive, check_shape


def build(input_shape: Sequence[int], num_classes: int, seed: int, *,
          embedding_size: int = 8, lstm_size: int = 256, num_lstm_layers: int = 2,
          mask_zero: bool = True) -> tf.keras.Model:
    """The character LSTM for token sequences of ``input_shape = (T,)`` over a
    vocabulary of ``num_classes`` ids (special tokens included; 0 is padding)."""
    shape = check_shape(input_shape, 1, "(T,) (a sequence of token ids)", "char_lstm")
    check_positive(num_classes=num_classes, embedding_size=embedding_size,
                   lstm_size=lstm_size, num_lstm_layers=num_lstm_layers)
    seeds = Seeds(seed)
    inputs = tf.keras.Input(shape=shape, dtype=tf.int32)
    x = tf.keras.layers.Embedding(int(num_classes), int(embedding_size), mask_zero=mask_zero,
                                  embeddings_initializer=seeds.embedding_uniform())(inputs)
    for _ in range(int(num_lstm_layers)):
        x = tf.keras.layers.LSTM(int(lstm_size), return_sequences=True, stateful=False,
                                 kernel_initializer=seeds.he_normal(),
                                 recurrent_initializer=seeds.orthogonal())(x)
    logits = tf.keras.layers.Dense(int(num_classes), kernel_initializer=seeds.glorot_uniform())(x)
    return tf.keras.Model(inputs, logits, name="char_lstm")

"""The word LSTM of Reddi et al. (ICLR 2021) for StackOverflow next-word
prediction: TFF 0.87's
``tff.simulation.baselines.stackoverflow.word_prediction_models.create_recurrent_model``.

Layers, exactly as TFF's::

    Embedding(vocab, 96, mask_zero=True)
    -> [LSTM(670, return_sequences) -> Dense(96)] x num_lstm_layers (1)
    -> Dense(vocab)            (or, with shared_embedding, the embedding transposed)

Keras' default initializers throughout (kernels Glorot-uniform, recurrent
kernels orthogonal, biases zero with unit forget bias, embedding
U(-0.05, 0.05)); no activations on the Dense layers. With TFF's vocabulary
(10,000 words + 4 special tokens = 10,004) it has 4,050,748 parameters.
Inputs are int32 token ids ``[batch, T]``, outputs logits ``[batch, T, vocab]``
(TFF's model outputs logits too); id 0 (padding) is masked as in TFF: the LSTMs
skip those steps.

Deliberate differences: the vocabulary is ``num_classes`` (special tokens
included) and the input has the fixed length ``T = input_shape[0]`` (TFF's
``Input(shape=(None,))`` takes any length; the weights are the same); every
initializer is seeded from ``seed`` (TFF's are unseeded).
"""

from __future__ import annotations

from typing import Any, Sequence

import tensorflow as tf

from fedsim.models._seeded import Seeds, check_positive, check_shape


class TransposableEmbedding(tf.keras.layers.Layer):
    """Logits as the products with every token's embedding: ``x @ E^T``, ``E`` the
    (shared, trained once) matrix of ``embedding`` (TFF's ``TransposableEmbedding``)."""

    def __init__(self, embedding: tf.keras.layers.Embedding, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embeddings = embedding.embeddings

    def call(self, inputs: Any) -> Any:
        return tf.matmul(inputs, self.embeddings, transpose_b=True)


def build(input_shape: Sequence[int], num_classes: int, seed: int, *,
          embedding_size: int = 96, num_lstm_layers: int = 1, lstm_size: int = 670,
          shared_embedding: bool = False) -> tf.keras.Model:
    """The word LSTM for token sequences of ``input_shape = (T,)`` over a
    vocabulary of ``num_classes`` ids (special tokens included; 0 is padding).
    ``shared_embedding``: the output layer is the transposed input embedding
    (no separate output weights), as TFF's option of that name."""
    shape = check_shape(input_shape, 1, "(T,) (a sequence of token ids)", "word_lstm")
    check_positive(num_classes=num_classes, embedding_size=embedding_size,
                   lstm_size=lstm_size, num_lstm_layers=num_lstm_layers)
    seeds = Seeds(seed)
    inputs = tf.keras.Input(shape=shape, dtype=tf.int32)
    embedding = tf.keras.layers.Embedding(int(num_classes), int(embedding_size), mask_zero=True,
                                          embeddings_initializer=seeds.embedding_uniform())
    x = embedding(inputs)
    for _ in range(int(num_lstm_layers)):
        x = tf.keras.layers.LSTM(int(lstm_size), return_sequences=True,
                                 kernel_initializer=seeds.glorot_uniform(),
                                 recurrent_initializer=seeds.orthogonal())(x)
        x = tf.keras.layers.Dense(int(embedding_size),
                                  kernel_initializer=seeds.glorot_uniform())(x)
    if shared_embedding:
        logits = TransposableEmbedding(embedding)(x)
    else:
        logits = tf.keras.layers.Dense(int(num_classes),
                                       kernel_initializer=seeds.glorot_uniform())(x)
    return tf.keras.Model(inputs, logits, name="word_lstm")

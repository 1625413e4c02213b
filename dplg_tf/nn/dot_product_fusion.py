"""DPLG's dot-product fusion of the global vector and the local map (section 3.3)."""

import math

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


def _float32(x):
    return ops.cast(x, "float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class DotProductFusion(keras.layers.Layer):
    """Dot-product fusion of section 3.3, Eq. 2-3.

    `fusion(local_features, global_vector)` with (B, H, W, C) and (B, G)
    returns `(local_vector, attention)`: Vl = A X_V of shape (B, units) and the
    attention A = softmax(X_Q X_K^T / sqrt(units)) reshaped to (B, H, W).
    Q, K and V are 1x1 convolutions (Q reads the global vector as a 1x1 map).
    The softmax and the weighted sum are float32 under mixed precision.
    """

    def __init__(self, units=1024, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        if units <= 0:
            raise ValueError(f"DotProductFusion needs units > 0, got {units}.")
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.query = keras.layers.Conv2D(units, 1, use_bias=use_bias, name="query",
                                           dtype=self.dtype_policy)
        self.key = keras.layers.Conv2D(units, 1, use_bias=use_bias, name="key",
                                         dtype=self.dtype_policy)
        self.value = keras.layers.Conv2D(units, 1, use_bias=use_bias, name="value",
                                           dtype=self.dtype_policy)

    def build(self, local_features_shape, global_vector_shape):
        local_shape, global_shape = local_features_shape, global_vector_shape
        if len(local_shape) != 4 or len(global_shape) != 2:
            raise ValueError(
                "DotProductFusion is called as fusion(local (B, H, W, C), "
                f"global (B, G)), got {local_shape} and {global_shape}.")
        self.key.build(local_shape)
        self.value.build(local_shape)
        self.query.build((global_shape[0], 1, 1, global_shape[1]))

    def call(self, local_features, global_vector):
        shape = ops.shape(local_features)
        q = self.query(ops.reshape(global_vector, (-1, 1, 1, ops.shape(global_vector)[-1])))
        q = _float32(ops.reshape(q, (-1, self.units)))
        k = _float32(ops.reshape(self.key(local_features), (shape[0], -1, self.units)))
        v = _float32(ops.reshape(self.value(local_features), (shape[0], -1, self.units)))
        logits = ops.einsum("bu,bnu->bn", q, k) / math.sqrt(self.units)
        attention = ops.softmax(logits, axis=-1)
        local_vector = ops.einsum("bn,bnu->bu", attention, v)
        attention = ops.reshape(attention, (shape[0], shape[1], shape[2]))
        return (ops.cast(local_vector, self.compute_dtype), attention)

    def compute_output_shape(self, local_features_shape, global_vector_shape):
        local_shape = local_features_shape
        return (local_shape[0], self.units), tuple(local_shape[:3])

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias)
        return config

"""Generalised-mean pooling (GeM), Eq. 1 of the paper."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


def _float32(x):
    return ops.cast(x, "float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class GeM(keras.layers.Layer):
    """Generalised-mean pooling, Eq. 1 of the paper: (B, H, W, C) -> (B, C).

    Activations are clipped to `eps` before the power. The pooling is computed
    as m * mean((x / m) ** p) ** (1 / p) with m the per-channel maximum (held
    constant for the gradient), which is the same value but cannot overflow
    for large p. The arithmetic is float32 whatever the compute dtype.
    """

    def __init__(self, p=3.0, trainable_p=False, eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        if p <= 0:
            raise ValueError(f"GeM needs p > 0, got p={p}.")
        self.p_init = float(p)
        self.trainable_p = bool(trainable_p)
        self.eps = float(eps)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"GeM expects (B, H, W, C) feature maps, got shape {input_shape}.")
        self.p = self.add_weight(
            name="p", shape=(), dtype="float32",
            initializer=keras.initializers.Constant(self.p_init),
            trainable=self.trainable_p)

    def call(self, x):
        x = ops.maximum(_float32(x), self.eps)
        p = ops.maximum(ops.cast(self.p, "float32"), 1e-3)
        m = ops.stop_gradient(ops.max(x, axis=(1, 2), keepdims=True))
        pooled = ops.mean(ops.power(x / m, p), axis=(1, 2))
        pooled = ops.power(ops.maximum(pooled, 1e-30), 1.0 / p)
        return ops.cast(pooled * ops.squeeze(m, axis=(1, 2)), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(p=self.p_init, trainable_p=self.trainable_p, eps=self.eps)
        return config

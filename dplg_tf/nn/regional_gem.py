"""Regional GeM (SuperGlobal, Shao et al. ICCV 2023): each position of a
feature map blended with the Lp-mean of its neighbourhood."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class RegionalGeM(keras.layers.Layer):
    """(B, H, W, C) -> (B, H, W, C): (x + mean_w(x^p)^(1/p)) / 2 with mean_w the
    mean over a `size` x `size` window around each position, stride 1. The
    window's mean counts only the positions inside the map (SuperGlobal pads
    by reflection, which needs maps larger than the window). Activations are
    clipped to `eps` inside the power and scaled by the per-channel maximum,
    as in GeM, so large p cannot overflow. float32 arithmetic."""

    def __init__(self, p=2.5, size=5, eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        if not p > 0 or int(size) < 1:
            raise ValueError(f"RegionalGeM needs p > 0 and size >= 1, got p={p}, size={size}.")
        self.p, self.size, self.eps = float(p), int(size), float(eps)

    def call(self, x):
        x = ops.cast(x, "float32")
        clipped = ops.maximum(x, self.eps)
        m = ops.stop_gradient(ops.max(clipped, axis=(1, 2), keepdims=True))
        pooled = ops.average_pool(ops.power(clipped / m, self.p), self.size, strides=1,
                                  padding="same")
        regional = ops.power(ops.maximum(pooled, 1e-30), 1.0 / self.p) * m
        return ops.cast(0.5 * x + 0.5 * regional, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(p=self.p, size=self.size, eps=self.eps)
        return config

"""DOLG's orthogonal fusion (Yang et al., ICCV 2021), a fourth head for comparison."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


def _float32(x):
    return ops.cast(x, "float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class OrthogonalFusion(keras.layers.Layer):
    """DOLG's orthogonal fusion (Yang et al., ICCV 2021), for comparison.

    `fusion(local_features, global_vector)` with (B, H, W, C) and (B, C):
    each local feature loses its projection on the global vector, the
    orthogonal parts are average-pooled, and the result is concatenated with
    the global vector: returns `(fused, saliency)` with fused (B, 2C) and
    saliency (B, H, W), the norm of each orthogonal part divided by their
    sum (non-negative, sums to 1), so it can be drawn like DPLG's attention.
    """

    def __init__(self, eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def build(self, local_features_shape, global_vector_shape):
        local_shape, global_shape = local_features_shape, global_vector_shape
        if len(local_shape) != 4 or len(global_shape) != 2:
            raise ValueError(
                "OrthogonalFusion is called as fusion(local (B, H, W, C), "
                f"global (B, C)), got {local_shape} and {global_shape}.")
        if (local_shape[-1] is not None and global_shape[-1] is not None
                and local_shape[-1] != global_shape[-1]):
            raise ValueError(
                "OrthogonalFusion needs local and global features of the same "
                f"width, got {local_shape[-1]} and {global_shape[-1]}.")

    def call(self, local_features, global_vector):
        f = _float32(local_features)
        g = _float32(global_vector)
        g4 = g[:, None, None, :]
        coeff = ops.sum(f * g4, axis=-1, keepdims=True) / (
            ops.sum(g * g, axis=-1)[:, None, None, None] + self.eps)
        orth = f - coeff * g4
        norms = ops.sqrt(ops.sum(orth * orth, axis=-1) + self.eps)
        saliency = norms / ops.sum(norms, axis=(1, 2), keepdims=True)
        fused = ops.concatenate([g, ops.mean(orth, axis=(1, 2))], axis=-1)
        return ops.cast(fused, self.compute_dtype), saliency

    def compute_output_shape(self, local_features_shape, global_vector_shape):
        local_shape = local_features_shape
        return (local_shape[0], 2 * local_shape[-1]), tuple(local_shape[:3])

    def get_config(self):
        config = super().get_config()
        config.update(eps=self.eps)
        return config

"""The ArcFace classification head (Deng et al., CVPR 2019) of DPLG's training
model, a Keras 3 layer with keras.ops only; also exported as
dplg_tf.nn.layers.ArcFaceMargin."""

import math

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class ArcFaceMargin(keras.layers.Layer):
    """ArcFace logits, Eq. 4-5: `arcface(embeddings, labels=None)` -> (B, N_c).

    Embeddings and class proxies are L2-normalised, u = cos(theta). Without
    labels the logits are scale * u. With labels, the label's class gets
    scale * cos(theta + m), computed as u cos m - sin(theta) sin m with a
    square root whose gradient is held at zero at u = +-1 (no NaN or Inf).
    Where theta + m > pi, cos(theta + m) would rise again as theta grows and
    reward a worse angle; there the target is u - (1 - cos m), which meets
    cos(theta + m) = -1 at theta = pi - m and keeps falling with theta.
    """

    def __init__(self, num_classes, margin=0.15, scale=30.0, **kwargs):
        super().__init__(**kwargs)
        if num_classes <= 0:
            raise ValueError(f"ArcFaceMargin needs num_classes > 0, got {num_classes}.")
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace margin must lie in [0, pi/2), got {margin}.")
        self.num_classes = int(num_classes)
        self.margin = float(margin)
        self.scale = float(scale)

    def build(self, embeddings_shape, labels_shape=None):
        self.proxies = self.add_weight(
            name="proxies", shape=(embeddings_shape[-1], self.num_classes),
            initializer=keras.initializers.GlorotNormal(), dtype="float32")

    def cosine(self, embeddings):
        """u = cos(theta) between each embedding and each class proxy."""
        e = ops.cast(embeddings, "float32")
        e = e / ops.sqrt(ops.maximum(ops.sum(e * e, axis=-1, keepdims=True), 1e-12))
        w = ops.cast(self.proxies, "float32")
        w = w / ops.sqrt(ops.maximum(ops.sum(w * w, axis=0, keepdims=True), 1e-12))
        return ops.clip(ops.matmul(e, w), -1.0, 1.0)

    def margin_cosine(self, u):
        """cos(arccos(u) + m) for theta + m <= pi, the falling extension beyond."""
        one_minus = 1.0 - u * u
        safe = ops.where(one_minus > 1e-12, one_minus, ops.ones_like(one_minus))
        sin_t = ops.where(one_minus > 1e-12, ops.sqrt(safe), ops.zeros_like(u))
        shifted = u * math.cos(self.margin) - sin_t * math.sin(self.margin)
        beyond = u - (1.0 - math.cos(self.margin))
        return ops.where(u >= -math.cos(self.margin), shifted, beyond)

    def call(self, embeddings, labels=None):
        u = self.cosine(embeddings)
        if labels is None:
            return self.scale * u
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        one_hot = ops.one_hot(labels, self.num_classes, dtype="float32")
        logits = ops.where(one_hot > 0, self.margin_cosine(u), u)
        return self.scale * logits

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return (embeddings_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, margin=self.margin,
                      scale=self.scale)
        return config

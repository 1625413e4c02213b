"""Learned whitening as the last layer of the exported descriptor."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class Whitening(keras.layers.Layer):
    """Learned whitening at the end of the descriptor: normalise(P (x - m)).

    `mean` [D] and `projection` (stored as P transposed, [D, output_dim]) are
    fixed weights, learned by dplg-whiten (dplg_tf.retrieval.whitening) and set with
    `Whitening.from_arrays(mean, projection)`; output_dim may be below D.
    """

    def __init__(self, output_dim, eps=1e-12, **kwargs):
        super().__init__(**kwargs)
        if output_dim <= 0:
            raise ValueError(f"Whitening needs output_dim > 0, got {output_dim}.")
        self.output_dim = int(output_dim)
        self.eps = float(eps)

    @classmethod
    def from_arrays(cls, mean, projection, **kwargs):
        import numpy as np

        projection = np.asarray(projection, np.float32)
        layer = cls(projection.shape[0], **kwargs)
        layer.build((None, projection.shape[1]))
        layer.set_weights([np.asarray(mean, np.float32), projection.T])
        return layer

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.mean = self.add_weight(shape=(dim,), initializer="zeros", trainable=False,
                                    name="mean")
        self.projection = self.add_weight(shape=(dim, self.output_dim),
                                          initializer="identity", trainable=False,
                                          name="projection")

    def call(self, x):
        y = ops.matmul(ops.cast(x, self.mean.dtype) - self.mean, self.projection)
        return y / ops.maximum(ops.sqrt(ops.sum(y * y, axis=-1, keepdims=True)), self.eps)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self.output_dim, eps=self.eps)
        return config

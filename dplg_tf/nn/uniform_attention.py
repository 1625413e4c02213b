"""A uniform attention map, for heads that have none."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class UniformAttention(keras.layers.Layer):
    """A uniform map (B, H, W) summing to 1, for heads without attention."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def call(self, feature_map):
        shape = ops.shape(feature_map)
        ones = ops.ones((shape[0], shape[1], shape[2]), dtype="float32")
        return ones / ops.cast(shape[1] * shape[2], "float32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3])

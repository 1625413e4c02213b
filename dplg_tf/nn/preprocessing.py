"""Images in [0, 255] to the backbone's input convention."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class ImagePreprocessing(keras.layers.Layer):
    """RGB images in [0, 255] -> the backbone's input convention.

    `caffe` (keras.applications ResNet): RGB -> BGR and ImageNet mean removed.
    `unit`: scaled to [-1, 1] (the small CPU backbone).
    """

    MODES = ("caffe", "unit")
    CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self, mode="caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; use one of {self.MODES}.")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)
            return x - ops.convert_to_tensor(self.CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        return x / 127.5 - 1.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode)
        return config

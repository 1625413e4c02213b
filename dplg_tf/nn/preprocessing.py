"""Images in [0, 255] to the backbone's input convention."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class ImagePreprocessing(keras.layers.Layer):
    """RGB images in [0, 255] -> the backbone's input convention.

    `caffe` (keras.applications ResNet): RGB -> BGR and ImageNet mean removed.
    `torch` (torchvision / timm / pycls weights): RGB / 255, ImageNet mean
    and standard deviation.
    `lite` (EfficientNet-Lite): (x - 127) / 128.
    `unit`: scaled to [-1, 1] (the small CPU backbone).
    """

    MODES = ("caffe", "torch", "lite", "unit")
    CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
    TORCH_MEAN = (0.485, 0.456, 0.406)
    TORCH_STD = (0.229, 0.224, 0.225)

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
        if self.mode == "torch":
            mean = ops.convert_to_tensor(self.TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(self.TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "lite":
            return (x - 127.0) / 128.0
        return x / 127.5 - 1.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode)
        return config

"""A check of the image size where it is known when the model is built."""

import keras

from dplg_tf.errors import UserError
from dplg_tf.nn import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class MinSizeCheck(keras.layers.Layer):
    """Refuses images smaller than `min_size` where the size is known statically."""

    def __init__(self, min_size=64, **kwargs):
        super().__init__(**kwargs)
        self.min_size = int(min_size)

    def call(self, images):
        for axis, name in ((1, "height"), (2, "width")):
            size = images.shape[axis]
            if isinstance(size, int) and size < self.min_size:
                raise UserError(
                    f"Image {name} is {size} px but the model needs at least "
                    f"{self.min_size} px; upscale or pad the image.")
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(min_size=self.min_size)
        return config

"""Backbones with two taps: X4 at stride 16 and X5 at stride 32.

`build_backbone(name, weights)` returns `(model, preprocessing_mode)` where
`model(images)` gives `[x4, x5]` for preprocessed images of any size.
"""

import os

import keras

from dplg_tf.errors import InputNotFound, UserError

# keras.applications constructor and the names of the stride-16 / stride-32 taps.
RESNETS = {
    "resnet50": ("ResNet50", "conv4_block6_out", "conv5_block3_out"),
    "resnet101": ("ResNet101", "conv4_block23_out", "conv5_block3_out"),
}
# the keras.applications weight files of the ResNets (include_top=False)
WEIGHT_FILES = {"resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "resnet101": "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"}
SMALL = "small"
BACKBONES = tuple(RESNETS) + (SMALL,)


def _check_weights(name, weights):
    if weights in (None, "", "none"):
        return None
    if weights == "imagenet":
        if name == SMALL:
            raise UserError(
                "The small backbone has no ImageNet weights; set backbone_weights to None.")
        return "imagenet"
    path = os.path.expanduser(str(weights))
    if not os.path.isfile(path):
        raise InputNotFound(
            f"Backbone weights file {path!r} does not exist; give the path of a "
            "local .h5 file (e.g. resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5) "
            "or 'imagenet' to let keras download it.")
    if not path.endswith(".h5"):
        raise UserError(f"Backbone weights must be a Keras .h5 file, got {path!r}.")
    return path


def _residual_block(x, filters, stride, name):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                            use_bias=False, name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                            name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                       name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def small_backbone(widths=(16, 32, 64, 128, 256)):
    """A five-stage residual net (one block per stage) for CPU tests and the demo.

    Stage i halves the resolution; the stride-16 and stride-32 stage outputs
    are the taps, with widths[3] and widths[4] channels.
    """
    inputs = keras.Input((None, None, 3), name="images")
    x = keras.layers.Conv2D(widths[0], 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    taps = []
    for i, w in enumerate(widths[1:], start=2):
        x = _residual_block(x, w, 2, f"stage{i}")
        taps.append(x)
    return keras.Model(inputs, taps[-2:], name="small_backbone")


def _first_line(error):
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def build_backbone(name, weights=None):
    """The backbone `name` with its X4/X5 taps and the preprocessing it expects."""
    if name not in BACKBONES:
        raise UserError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")
    weights = _check_weights(name, weights)
    if name == SMALL:
        return small_backbone(), "unit"
    ctor, tap4, tap5 = RESNETS[name]
    if weights is None:
        from absl import logging

        logging.warning("%s starts from random weights: the paper's recipe fine-tunes "
                        "ImageNet weights; set config.model.backbone_weights to "
                        "'imagenet' or the path of a local .h5 file.", name)
    try:
        full = getattr(keras.applications, ctor)(
            include_top=False, weights=weights, input_shape=(None, None, 3))
    except Exception as e:  # noqa: BLE001 - keras raises a bare Exception for a failed fetch
        if weights != "imagenet" or "fetch" not in str(e).lower():
            raise
        raise UserError(
            f"The ImageNet weights of {name} could not be downloaded ({_first_line(e)}); "
            f"download {WEIGHT_FILES[name]} on a machine with a network and set "
            "config.model.backbone_weights to its local path.") from None
    model = keras.Model(full.inputs,
                        [full.get_layer(tap4).output, full.get_layer(tap5).output],
                        name=name)
    return model, "caffe"

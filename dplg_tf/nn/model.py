"""The DPLG model (section 3) and its ablation heads.

`build_dplg(config)` -> keras.Model: RGB images in [0, 255], (B, H, W, 3)
with H, W >= config.model.min_image_size, to
`{"descriptor": (B, D) unit-norm, "attention": (B, ceil(H/16), ceil(W/16))}`.

Heads (config.model.head), the rows of the paper's Table 2 and DOLG:
- dplg:      X'4 = RFB(X4); Vl, A = DotProductFusion(X'4, V'g); F = FC(V'g + Vl)
- no_rfb:    as dplg with RFB replaced by a 1x1 conv (+BN, ReLU)
- no_fusion: as dplg with the fusion replaced by Vl = GeM(X'4); A is uniform
- gem:       F = FC(GeM(X5)), plain GeM (Radenovic et al.); A is uniform
- dolg:      X'4 = RFB(X4); F = FC(OrthogonalFusion(X'4, V'g)); A is the
             normalised norm of the orthogonal parts
with V'g = FC(GeM(X5)) of width config.model.local_dim.
"""

import keras
from keras import ops

from dplg_tf.nn import backbones
from dplg_tf.nn import layers
from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.config import validate


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class UniformAttention(keras.layers.Layer):
    """A uniform map (B, H, W) summing to 1, for heads without attention."""

    def call(self, feature_map):
        shape = ops.shape(feature_map)
        ones = ops.ones((shape[0], shape[1], shape[2]), dtype="float32")
        return ones / ops.cast(shape[1] * shape[2], "float32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3])


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
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


def _model_config(config):
    return config.model if "model" in config else config


def _local_refinement(m, x4):
    if m.head == "no_rfb":
        x = keras.layers.Conv2D(m.local_dim, 1, use_bias=False, name="local_conv")(x4)
        x = keras.layers.BatchNormalization(name="local_bn")(x)
        return keras.layers.ReLU(name="local_relu")(x)
    return layers.ReceptiveFieldBlock(
        filters=m.local_dim, branch_filters=m.rfb_branch_filters or None,
        use_batchnorm=m.rfb_batchnorm, gem_p=m.gem_p, name="rfb")(x4)


def build_dplg(config, name=None):
    """The descriptor model of `config` (a full config or its `model` part)."""
    validate(config)
    m = _model_config(config)
    backbone, mode = backbones.build_backbone(m.backbone, m.backbone_weights)

    images = keras.Input((None, None, 3), name="images")
    x = MinSizeCheck(m.min_image_size, name="min_size_check")(images)
    x = layers.ImagePreprocessing(mode, name="preprocessing")(x)
    x4, x5 = backbone(x)

    vg = layers.GeM(p=m.gem_p, trainable_p=m.gem_trainable, name="global_gem")(x5)
    if m.head == "gem":
        features = vg
        attention = UniformAttention(name="attention")(x4)
    else:
        vg = keras.layers.Dense(m.local_dim, name="global_reduction")(vg)
        local = _local_refinement(m, x4)
        if m.head in ("dplg", "no_rfb"):
            vl, attention = layers.DotProductFusion(m.local_dim, name="fusion")(local, vg)
            features = keras.layers.Add(name="fuse_add")([vg, vl])
        elif m.head == "no_fusion":
            vl = layers.GeM(p=m.gem_p, name="local_gem")(local)
            features = keras.layers.Add(name="fuse_add")([vg, vl])
            attention = UniformAttention(name="attention")(x4)
        else:  # dolg
            features, attention = layers.OrthogonalFusion(name="fusion")(local, vg)
    f = keras.layers.Dense(m.descriptor_dim, name="descriptor_fc")(features)
    descriptor = keras.layers.UnitNormalization(name="descriptor", dtype="float32")(f)
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

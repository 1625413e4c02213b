"""DPLG building blocks as backend-agnostic Keras 3 layers (keras.ops only).

Every layer is registered for `.keras` serialisation and can be used alone.
Shapes are channels-last: images and feature maps are (B, H, W, C).
"""

import math

import keras
from keras import ops

from dplg_tf.nn.arcface import ArcFaceMargin

PACKAGE = "dplg_tf"
__all__ = ["GeM", "ReceptiveFieldBlock", "DotProductFusion", "OrthogonalFusion",
           "ArcFaceMargin", "ImagePreprocessing", "Whitening"]


def _float32(x):
    return ops.cast(x, "float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class GeM(keras.layers.Layer):
    """Generalised-mean pooling, Eq. 1 of the paper: (B, H, W, C) -> (B, C).

    Activations are clipped to `eps` before the power. The pooling is computed
    as m * mean((x / m) ** p) ** (1 / p) with m the per-channel maximum (held
    constant for the gradient), which is the same value but cannot overflow
    for large p. The arithmetic is float32 whatever the compute dtype.
    """

    def __init__(self, p=3.0, trainable_p=False, eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        if p <= 0:
            raise ValueError(f"GeM needs p > 0, got p={p}.")
        self.p_init = float(p)
        self.trainable_p = bool(trainable_p)
        self.eps = float(eps)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"GeM expects (B, H, W, C) feature maps, got shape {input_shape}.")
        self.p = self.add_weight(
            name="p", shape=(), dtype="float32",
            initializer=keras.initializers.Constant(self.p_init),
            trainable=self.trainable_p)

    def call(self, x):
        x = ops.maximum(_float32(x), self.eps)
        p = ops.maximum(ops.cast(self.p, "float32"), 1e-3)
        m = ops.stop_gradient(ops.max(x, axis=(1, 2), keepdims=True))
        pooled = ops.mean(ops.power(x / m, p), axis=(1, 2))
        pooled = ops.power(ops.maximum(pooled, 1e-30), 1.0 / p)
        return ops.cast(pooled * ops.squeeze(m, axis=(1, 2)), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(p=self.p_init, trainable_p=self.trainable_p, eps=self.eps)
        return config


def _conv_bn_act(filters, kernel_size, dilation, use_batchnorm, activation, name):
    """A conv (no bias when a norm follows), optional BatchNorm and activation."""
    layers = [keras.layers.Conv2D(
        filters, kernel_size, padding="same", dilation_rate=dilation,
        use_bias=not use_batchnorm, name=f"{name}_conv")]
    if use_batchnorm:
        layers.append(keras.layers.BatchNormalization(name=f"{name}_bn"))
    if activation:
        layers.append(keras.layers.Activation(activation, name=f"{name}_act"))
    return layers


def _run(layers, x, training):
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            x = layer(x, training=training)
        else:
            x = layer(x)
    return x


@keras.saving.register_keras_serializable(package=PACKAGE)
class ReceptiveFieldBlock(keras.layers.Layer):
    """Receptive field block of section 3.2: (B, H, W, C) -> (B, H, W, filters).

    Three convolution branches, each two convolutions: the first with kernel
    1, 3 and 5, the second a 3x3 with dilation 1, 3 and 5. A fourth branch is
    GeM over the input, projected by a 1x1 convolution and broadcast back to
    H x W. The four outputs are concatenated and a 1x1 convolution gives the
    refined map X'4.

    Choices the paper leaves open (all constructor arguments):
    - `branch_filters` defaults to filters // 4, so that the concatenation has
      `filters` channels, as wide as the block's input and output in Fig. 1.
    - Each convolution is followed by BatchNorm and ReLU (`use_batchnorm`,
      `activation`): X4 is a post-ReLU ResNet map and the K/V projections that
      read X'4 expect the same kind of input; BatchNorm keeps the new branches
      trainable at lr 0.03 next to a pre-trained backbone.
    - The GeM branch uses p = `gem_p` (3, as the global branch) and its own
      1x1 projection to `branch_filters`, so no branch dominates the concat.
    - No shortcut connection (RFBNet has one; the paper does not mention it).
    """

    KERNELS = (1, 3, 5)
    DILATIONS = (1, 3, 5)

    def __init__(self, filters=1024, branch_filters=None, use_batchnorm=True,
                 activation="relu", gem_p=3.0, **kwargs):
        super().__init__(**kwargs)
        if filters <= 0:
            raise ValueError(f"ReceptiveFieldBlock needs filters > 0, got {filters}.")
        self.filters = int(filters)
        self.branch_filters = int(branch_filters or max(1, filters // 4))
        self.use_batchnorm = bool(use_batchnorm)
        self.activation = activation
        self.gem_p = float(gem_p)
        self.branches = []
        for i, (k, d) in enumerate(zip(self.KERNELS, self.DILATIONS)):
            self.branches.append(
                _conv_bn_act(self.branch_filters, k, 1, self.use_batchnorm,
                             activation, f"branch{i}_a")
                + _conv_bn_act(self.branch_filters, 3, d, self.use_batchnorm,
                               activation, f"branch{i}_b"))
        self.gem = GeM(p=self.gem_p, name="gem")
        self.gem_proj = _conv_bn_act(self.branch_filters, 1, 1, False,
                                     activation, "gem_proj")
        self.fuse = _conv_bn_act(self.filters, 1, 1, self.use_batchnorm,
                                 activation, "fuse")
        # Each sublayer is also a named attribute: tf.train.Checkpoint follows
        # attributes, not layers held in (nested) lists, and would skip them.
        for layer in [l for b in self.branches for l in b] + self.gem_proj + self.fuse:
            setattr(self, layer.name, layer)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"ReceptiveFieldBlock expects (B, H, W, C), got {input_shape}.")
        shape = tuple(input_shape)
        for branch in self.branches:
            s = shape
            for layer in branch:
                layer.build(s)
                s = layer.compute_output_shape(s)
        self.gem.build(shape)
        s = (shape[0], 1, 1, shape[-1])
        for layer in self.gem_proj:
            layer.build(s)
            s = layer.compute_output_shape(s)
        s = shape[:3] + (4 * self.branch_filters,)
        for layer in self.fuse:
            layer.build(s)
            s = layer.compute_output_shape(s)

    def call(self, x, training=None):
        outs = [_run(branch, x, training) for branch in self.branches]
        g = ops.expand_dims(ops.expand_dims(self.gem(x), 1), 1)
        g = _run(self.gem_proj, g, training)
        g = ops.broadcast_to(g, ops.shape(outs[0]))
        return _run(self.fuse, ops.concatenate(outs + [g], axis=-1), training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, branch_filters=self.branch_filters,
                      use_batchnorm=self.use_batchnorm,
                      activation=self.activation, gem_p=self.gem_p)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class DotProductFusion(keras.layers.Layer):
    """Dot-product fusion of section 3.3, Eq. 2-3.

    `fusion(local_features, global_vector)` with (B, H, W, C) and (B, G)
    returns `(local_vector, attention)`: Vl = A X_V of shape (B, units) and the
    attention A = softmax(X_Q X_K^T / sqrt(units)) reshaped to (B, H, W).
    Q, K and V are 1x1 convolutions (Q reads the global vector as a 1x1 map).
    The softmax and the weighted sum are float32 under mixed precision.
    """

    def __init__(self, units=1024, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        if units <= 0:
            raise ValueError(f"DotProductFusion needs units > 0, got {units}.")
        self.units = int(units)
        self.use_bias = bool(use_bias)
        self.query = keras.layers.Conv2D(units, 1, use_bias=use_bias, name="query")
        self.key = keras.layers.Conv2D(units, 1, use_bias=use_bias, name="key")
        self.value = keras.layers.Conv2D(units, 1, use_bias=use_bias, name="value")

    def build(self, local_features_shape, global_vector_shape):
        local_shape, global_shape = local_features_shape, global_vector_shape
        if len(local_shape) != 4 or len(global_shape) != 2:
            raise ValueError(
                "DotProductFusion is called as fusion(local (B, H, W, C), "
                f"global (B, G)), got {local_shape} and {global_shape}.")
        self.key.build(local_shape)
        self.value.build(local_shape)
        self.query.build((global_shape[0], 1, 1, global_shape[1]))

    def call(self, local_features, global_vector):
        shape = ops.shape(local_features)
        q = self.query(ops.reshape(global_vector, (-1, 1, 1, ops.shape(global_vector)[-1])))
        q = _float32(ops.reshape(q, (-1, self.units)))
        k = _float32(ops.reshape(self.key(local_features), (shape[0], -1, self.units)))
        v = _float32(ops.reshape(self.value(local_features), (shape[0], -1, self.units)))
        logits = ops.einsum("bu,bnu->bn", q, k) / math.sqrt(self.units)
        attention = ops.softmax(logits, axis=-1)
        local_vector = ops.einsum("bn,bnu->bu", attention, v)
        attention = ops.reshape(attention, (shape[0], shape[1], shape[2]))
        return (ops.cast(local_vector, self.compute_dtype), attention)

    def compute_output_shape(self, local_features_shape, global_vector_shape):
        local_shape = local_features_shape
        return (local_shape[0], self.units), tuple(local_shape[:3])

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class OrthogonalFusion(keras.layers.Layer):
    """DOLG's orthogonal fusion (Yang et al., ICCV 2021), for comparison.

    `fusion(local_features, global_vector)` with (B, H, W, C) and (B, C):
    each local feature loses its projection on the global vector, the
    orthogonal parts are average-pooled, and the result is concatenated with
    the global vector: returns `(fused, saliency)` with fused (B, 2C) and
    saliency (B, H, W), the norm of each orthogonal part divided by their
    sum (non-negative, sums to 1), so it can be drawn like DPLG's attention.
    """

    def __init__(self, eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def build(self, local_features_shape, global_vector_shape):
        local_shape, global_shape = local_features_shape, global_vector_shape
        if len(local_shape) != 4 or len(global_shape) != 2:
            raise ValueError(
                "OrthogonalFusion is called as fusion(local (B, H, W, C), "
                f"global (B, C)), got {local_shape} and {global_shape}.")
        if (local_shape[-1] is not None and global_shape[-1] is not None
                and local_shape[-1] != global_shape[-1]):
            raise ValueError(
                "OrthogonalFusion needs local and global features of the same "
                f"width, got {local_shape[-1]} and {global_shape[-1]}.")

    def call(self, local_features, global_vector):
        f = _float32(local_features)
        g = _float32(global_vector)
        g4 = g[:, None, None, :]
        coeff = ops.sum(f * g4, axis=-1, keepdims=True) / (
            ops.sum(g * g, axis=-1)[:, None, None, None] + self.eps)
        orth = f - coeff * g4
        norms = ops.sqrt(ops.sum(orth * orth, axis=-1) + self.eps)
        saliency = norms / ops.sum(norms, axis=(1, 2), keepdims=True)
        fused = ops.concatenate([g, ops.mean(orth, axis=(1, 2))], axis=-1)
        return ops.cast(fused, self.compute_dtype), saliency

    def compute_output_shape(self, local_features_shape, global_vector_shape):
        local_shape = local_features_shape
        return (local_shape[0], 2 * local_shape[-1]), tuple(local_shape[:3])

    def get_config(self):
        config = super().get_config()
        config.update(eps=self.eps)
        return config


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

"""The receptive field block (RFB) of section 3.2."""

import keras
from keras import ops

from dplg_tf.nn import PACKAGE
from dplg_tf.nn.gem import GeM


def _conv_bn_act(filters, kernel_size, dilation, use_batchnorm, activation, name, dtype):
    """A conv (no bias when a norm follows), optional BatchNorm and activation."""
    layers = [keras.layers.Conv2D(
        filters, kernel_size, padding="same", dilation_rate=dilation,
        use_bias=not use_batchnorm, name=f"{name}_conv", dtype=dtype)]
    if use_batchnorm:
        layers.append(keras.layers.BatchNormalization(name=f"{name}_bn", dtype=dtype))
    if activation:
        layers.append(keras.layers.Activation(activation, name=f"{name}_act", dtype=dtype))
    return layers


def _run(layers, x):
    for layer in layers:
        x = layer(x)  # Keras passes the call's `training` on to the BatchNorms
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
                             activation, f"branch{i}_a", self.dtype_policy)
                + _conv_bn_act(self.branch_filters, 3, d, self.use_batchnorm,
                               activation, f"branch{i}_b", self.dtype_policy))
        self.gem = GeM(p=self.gem_p, name="gem", dtype=self.dtype_policy)
        self.gem_proj = _conv_bn_act(self.branch_filters, 1, 1, False,
                                     activation, "gem_proj", self.dtype_policy)
        self.fuse = _conv_bn_act(self.filters, 1, 1, self.use_batchnorm,
                                 activation, "fuse", self.dtype_policy)
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

    def call(self, x):
        outs = [_run(branch, x) for branch in self.branches]
        g = ops.expand_dims(ops.expand_dims(self.gem(x), 1), 1)
        g = ops.broadcast_to(_run(self.gem_proj, g), ops.shape(outs[0]))
        return _run(self.fuse, ops.concatenate(outs + [g], axis=-1))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:3]) + (self.filters,)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, branch_filters=self.branch_filters,
                      use_batchnorm=self.use_batchnorm,
                      activation=self.activation, gem_p=self.gem_p)
        return config

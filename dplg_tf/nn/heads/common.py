"""Pieces several heads share: V'g, the RFB and the Add that fuses Vl into V'g."""

import keras

from dplg_tf.nn.layers import GeM, ReceptiveFieldBlock

FUSION_LAYER = "fuse_add"  # the Add whose inputs are (V'g, Vl); read by the diagnostics


def kernel_initializer(m):
    """The FCs' initial kernel: Glorot, or an identity (semi-orthogonal if not square)."""
    return "identity" if m.get("head_init", "random") == "identity" else "glorot_uniform"


def global_vector(m, x5):
    """V'g = FC(GeM(X5)), of width m.local_dim."""
    vg = GeM(p=m.gem_p, trainable_p=m.gem_trainable, name="global_gem")(x5)
    return keras.layers.Dense(m.local_dim, name="global_reduction",
                              kernel_initializer=kernel_initializer(m))(vg)


def start_silent(m, fusion):
    """With head_init identity, Vl starts at 0: the fusion's value projection is zeroed."""
    if m.get("head_init", "random") == "identity":
        fusion.value.kernel.assign(keras.ops.zeros_like(fusion.value.kernel))


def rfb(m, x4):
    """X'4 = RFB(X4) with the config's branch widths and norms."""
    return ReceptiveFieldBlock(filters=m.local_dim, branch_filters=m.rfb_branch_filters or None,
                               use_batchnorm=m.rfb_batchnorm, gem_p=m.gem_p, name="rfb")(x4)


def fuse(vg, vl):
    return keras.layers.Add(name=FUSION_LAYER)([vg, vl])

"""Pieces several heads share: V'g, the RFB and the Add that fuses Vl into V'g."""

import keras

from dplg_tf.nn.layers import GeM, ReceptiveFieldBlock

FUSION_LAYER = "fuse_add"  # the Add whose inputs are (V'g, Vl); read by the diagnostics


def global_vector(m, x5):
    """V'g = FC(GeM(X5)), of width m.local_dim."""
    vg = GeM(p=m.gem_p, trainable_p=m.gem_trainable, name="global_gem")(x5)
    return keras.layers.Dense(m.local_dim, name="global_reduction")(vg)


def rfb(m, x4):
    """X'4 = RFB(X4) with the config's branch widths and norms."""
    return ReceptiveFieldBlock(filters=m.local_dim, branch_filters=m.rfb_branch_filters or None,
                               use_batchnorm=m.rfb_batchnorm, gem_p=m.gem_p, name="rfb")(x4)


def fuse(vg, vl):
    return keras.layers.Add(name=FUSION_LAYER)([vg, vl])

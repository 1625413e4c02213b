"""Table 2's "no RFB": DPLG with the RFB replaced by a 1x1 conv, BatchNorm and ReLU."""

import keras

from dplg_tf.nn.heads.common import fuse, global_vector, start_silent
from dplg_tf.nn.layers import DotProductFusion


def build(m, x4, x5):
    vg = global_vector(m, x5)
    x = keras.layers.Conv2D(m.local_dim, 1, use_bias=False, name="local_conv")(x4)
    x = keras.layers.BatchNormalization(name="local_bn")(x)
    local = keras.layers.ReLU(name="local_relu")(x)
    fusion = DotProductFusion(m.local_dim, name="fusion")
    vl, attention = fusion(local, vg)
    start_silent(m, fusion)
    return fuse(vg, vl), attention

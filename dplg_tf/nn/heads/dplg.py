"""DPLG (the paper): X'4 = RFB(X4); Vl, A = DotProductFusion(X'4, V'g); F = V'g + Vl."""

from dplg_tf.nn.heads.common import fuse, global_vector, rfb
from dplg_tf.nn.layers import DotProductFusion


def build(m, x4, x5):
    vg = global_vector(m, x5)
    local = rfb(m, x4)  # built before the fusion: the same initial weights for a seed as before
    vl, attention = DotProductFusion(m.local_dim, name="fusion")(local, vg)
    return fuse(vg, vl), attention

"""DPLG (the paper): X'4 = RFB(X4); Vl, A = DotProductFusion(X'4, V'g); F = V'g + Vl."""

from dplg_tf.nn.heads.common import fuse, global_vector, start_silent, rfb
from dplg_tf.nn.layers import DotProductFusion


def build(m, x4, x5):
    vg = global_vector(m, x5)
    local = rfb(m, x4)  # built before the fusion: the same initial weights for a seed as before
    fusion = DotProductFusion(m.local_dim, name="fusion")
    vl, attention = fusion(local, vg)
    start_silent(m, fusion)
    return fuse(vg, vl), attention

"""Table 2's "no dot-product": Vl = GeM(RFB(X4)) added to V'g; the attention is uniform."""

from dplg_tf.nn.heads.common import fuse, global_vector, rfb
from dplg_tf.nn.layers import GeM, UniformAttention


def build(m, x4, x5):
    vg = global_vector(m, x5)
    local = rfb(m, x4)
    vl = GeM(p=m.gem_p, name="local_gem")(local)
    return fuse(vg, vl), UniformAttention(name="attention")(x4)

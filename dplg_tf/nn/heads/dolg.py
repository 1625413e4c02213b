"""DOLG's orthogonal fusion (Yang et al., ICCV 2021): F = OrthogonalFusion(RFB(X4), V'g)."""

from dplg_tf.nn.heads.common import global_vector, rfb
from dplg_tf.nn.layers import OrthogonalFusion


def build(m, x4, x5):
    vg = global_vector(m, x5)
    local = rfb(m, x4)
    return OrthogonalFusion(name="fusion")(local, vg)

"""The heads: what stands between the backbone's two taps and the descriptor FC.

A head is one module of this package and one entry of HEADS. Its
`build(m, x4, x5)` takes the model config `m` and the stride-16 / stride-32
maps and returns `(features, attention)`: the vector the descriptor FC reads
and an attention map (B, H4, W4) that sums to 1. Heads that add a local
vector Vl to the global V'g do it in a keras Add layer named FUSION_LAYER,
whose two inputs the fusion diagnostics read.

- dplg:      X'4 = RFB(X4); Vl, A = DotProductFusion(X'4, V'g); F = V'g + Vl
- no_rfb:    as dplg with RFB replaced by a 1x1 conv (+BN, ReLU)
- no_fusion: as dplg with the fusion replaced by Vl = GeM(X'4); A is uniform
- gem:       F = GeM(X5), plain GeM (Radenovic et al.); A is uniform
- dolg:      X'4 = RFB(X4); F = OrthogonalFusion(X'4, V'g); A is the
             normalised norm of the orthogonal parts
with V'g = FC(GeM(X5)) of width m.local_dim.

m.head_init = "identity" starts the FCs as identities (or semi-orthogonal
where the widths differ) and the fusion's value projection at zero, so an
untrained head gives the backbone's own GeM vector (for fine-tuning
pretrained backbones; needs local_dim = the X5 width to be exact).
"""

from dplg_tf.errors import UserError
from dplg_tf.nn.heads import dolg, dplg, gem, no_fusion, no_rfb
from dplg_tf.nn.heads.common import FUSION_LAYER  # noqa: F401 (the diagnostics read it)
from dplg_tf.nn.heads.common import kernel_initializer  # noqa: F401 (the model's FC uses it)

HEADS = {"dplg": dplg.build, "no_rfb": no_rfb.build, "no_fusion": no_fusion.build,
         "gem": gem.build, "dolg": dolg.build}


def get(name):
    """The build function of head `name`, or a UserError naming the known ones."""
    if name not in HEADS:
        raise UserError(f"config.model.head={name!r} is unknown; use one of "
                        f"{', '.join(HEADS)}.")
    return HEADS[name]

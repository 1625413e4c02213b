"""Is the local branch used? Two numbers about DPLG's fusion.

- The attention's normalised entropy H(A) / log(H4 * W4): 1 when A is
  uniform (the local vector is then a plain average of V), near 0 when A
  picks a few positions.
- The ratio |Vl| / |V'g| of the fused local vector to the global one: near 0
  when the descriptor is in effect GeM alone.

The trainer writes both to TensorBoard (`fusion/...`, with the validation
scalars); dplg-eval --figures reports the entropy of the drawn queries.
"""

import numpy as np

from dplg_tf.images.attention import entropy as attention_entropy


def fusion_probe(embedder):
    """A model images -> {global, local, attention} for heads that fuse a local
    vector into V'g (dplg, no_rfb, no_fusion); None for the others."""
    import keras

    from dplg_tf.nn.heads import FUSION_LAYER

    if FUSION_LAYER not in {layer.name for layer in embedder.layers}:
        return None
    add = embedder.get_layer(FUSION_LAYER)
    vg, vl = add.input
    return keras.Model(embedder.input, {"global": vg, "local": vl,
                                        "attention": embedder.output["attention"]})


def fusion_stats(probe, images):
    """{attention_entropy, local_to_global_norm}: means over the batch."""
    out = probe(images, training=False)
    vg, vl = np.asarray(out["global"], np.float64), np.asarray(out["local"], np.float64)
    ratio = np.linalg.norm(vl, axis=1) / np.maximum(np.linalg.norm(vg, axis=1), 1e-12)
    return {"attention_entropy": float(attention_entropy(out["attention"]).mean()),
            "local_to_global_norm": float(ratio.mean())}

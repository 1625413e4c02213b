"""The precision an export computes in (dplg-export --precision).

`in_precision(model, precision)` is a copy of `model` whose layers compute
in bfloat16 or float16 (Keras' mixed policies: the weights stay float32 and
are cast as each layer runs), with the same weights. Kept in float32 are
the layers whose arithmetic is sensitive or cheap: the input checks and
preprocessing, and the final normalisation and attention map (so the
SavedModel returns float32). GeM and the fusion's softmax already compute in
float32 inside under a mixed policy (dplg_tf.nn). The export records the
precision as the SavedModel's `precision` variable.

bfloat16 pays on convolutions with many channels (ResNet50: 1.4x the
images/s of float32 on a 2-core AVX-512 BF16 CPU, cosine 0.99999) and not on
depthwise ones (EfficientNet-Lite0: 0.6x, cosine >= 0.995); see
benchmarks/RESULTS.md.
"""

from dplg_tf.errors import UserError

# --precision -> the Keras dtype policy of the computing layers
POLICIES = {"float32": None, "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
FLOAT32_LAYERS = {"min_size_check", "preprocessing", "descriptor", "attention_map"}


def check(precision):
    if precision not in POLICIES:
        raise UserError(f"--precision={precision!r} is unknown; use one of "
                        f"{', '.join(POLICIES)}.")
    return precision


def in_precision(model, precision):
    """`model` computing in `precision` (a new model; `model` for float32)."""
    import keras

    policy = POLICIES[check(precision)]
    if policy is None:
        return model

    def copy(layer):
        if isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth"):
            return keras.models.clone_model(layer, clone_function=copy)  # a nested backbone
        if isinstance(layer, keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        if layer.name not in FLOAT32_LAYERS:
            config["dtype"] = keras.DTypePolicy(policy)
        return layer.__class__.from_config(config)

    copied = keras.models.clone_model(model, clone_function=copy)
    source, target = model.weights, copied.weights
    if [w.path for w in source] != [w.path for w in target]:
        raise RuntimeError("the copy in another precision does not have the model's "
                           "weights in the same order")  # a bug, not a user error
    for s, t in zip(source, target):
        t.assign(s)
    return copied

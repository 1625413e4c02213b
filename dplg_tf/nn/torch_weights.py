"""PyTorch state dicts copied into Keras layers named after the torch modules.

A backbone built for PyTorch weights names each layer after its module with
"." -> "_" and leading "_" dropped ("layer1.0.conv1" -> "layer1_0_conv1",
"_blocks.3._bn1" -> "blocks_3_bn1"); `load_torch_weights` then copies a
state dict by name, transposing kernels (torch OIHW -> Keras HWIO, depthwise
(C, 1, k, k) -> (k, k, C, 1), dense (O, I) -> (I, O)). pycls names (CVNet,
SuperGlobal, DOLG) are renamed to torchvision's first, and a common prefix
(`module.`, `encoder_q.`, ...) is dropped.
"""

import re

import keras
import numpy as np

from dplg_tf.errors import UserError


def keras_name(module):
    return "_".join(part.lstrip("_") for part in module.split("."))


# pycls (CVNet, SuperGlobal, DOLG) module names -> torchvision's
_PYCLS = ((re.compile(r"^stem\.conv\."), "conv1."), (re.compile(r"^stem\.bn\."), "bn1."),
          (re.compile(r"^head\.fc\."), "fc."))
_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(f\.a|f\.a_bn|f\.b|f\.b_bn|f\.c|f\.c_bn|proj|bn)\.")
_PYCLS_PARTS = {"f.a": "conv1", "f.a_bn": "bn1", "f.b": "conv2", "f.b_bn": "bn2",
                "f.c": "conv3", "f.c_bn": "bn3", "proj": "downsample.0", "bn": "downsample.1"}
_ANCHORS = ("conv1.weight", "stem.conv.weight", "_conv_stem.weight")
_IGNORED = ("num_batches_tracked",)


def _strip_prefix(state):
    """Drop a common prefix (`module.`, `encoder_q.`, `backbone.`, ...) found at the stem."""
    for key in state:
        for anchor in _ANCHORS:
            if key.endswith(anchor) and (key == anchor or key[-len(anchor) - 1] == "."):
                prefix = key[:-len(anchor)]
                return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def torchvision_names(state):
    """A ResNet state dict with pycls names renamed to torchvision's (others kept)."""
    renamed = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _PYCLS:
            new = pattern.sub(repl, new)
        match = _PYCLS_BLOCK.match(new)
        if match:
            stage, block, part = match.groups()
            new = (f"layer{stage}.{int(block) - 1}.{_PYCLS_PARTS[part]}."
                   + new[match.end():])
        renamed[new] = value
    return renamed


def _layer_weights(layer, state, module):
    """The Keras weights of `layer` from the torch tensors `module.*`, or the missing names."""
    def get(suffix):
        return state.get(f"{module}.{suffix}")

    if isinstance(layer, keras.layers.BatchNormalization):
        names = ("weight", "bias", "running_mean", "running_var")
        return names, [get(n) for n in names], lambda t: t
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # torch (C, 1, k, k) -> (k, k, C, 1)
        return ("weight",), [get("weight")], lambda t: t.transpose(2, 3, 0, 1)
    if isinstance(layer, keras.layers.Conv2D):  # torch (O, I, k, k) -> (k, k, I, O)
        names = ("weight", "bias") if layer.use_bias else ("weight",)
        return names, [get(n) for n in names], lambda t: t.transpose(2, 3, 1, 0)
    if isinstance(layer, keras.layers.Dense):  # torch (O, I) -> (I, O)
        return ("weight", "bias"), [get("weight"), get("bias")], lambda t: t.T
    return (), [], None


def load_torch_weights(model, state, source="the weight file"):
    """Copy the PyTorch state dict `state` into `model`'s layers, by name.

    Layers are named after torch modules (keras_name). Keys the model has no
    layer for, weights the file lacks and shapes that differ raise one
    UserError that names them (up to five of each)."""
    state = _strip_prefix({k: v for k, v in state.items()
                           if not k.endswith(_IGNORED)})
    if any(k.startswith(("stem.", "s1.")) for k in state):
        state = torchvision_names(state)
    modules = {}
    for key in state:
        modules.setdefault(keras_name(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[0])
    used, missing, wrong, assignments = set(), [], [], []
    for layer in model.layers:
        module = modules.get(layer.name, layer.name)
        names, tensors, convert = _layer_weights(layer, state, module)
        for suffix, tensor, variable in zip(names, tensors, layer.weights):
            key = f"{module}.{suffix}"
            if tensor is None:
                missing.append(key)
                continue
            used.add(key)
            value = convert(np.asarray(tensor))
            if tuple(value.shape) != tuple(variable.shape):
                wrong.append(f"{key} {tuple(tensor.shape)}")
                continue
            assignments.append((variable, value))
    unknown = sorted(set(state) - used)
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape ({', '.join(wrong[:5])})")
    if missing:
        problems.append(f"{len(missing)} weights missing ({', '.join(missing[:5])})")
    if unknown:
        problems.append(f"{len(unknown)} unknown keys ({', '.join(unknown[:5])})")
    if problems:
        raise UserError(f"{source} does not fit the {model.name} backbone: "
                        f"{'; '.join(problems)}.")
    for variable, value in assignments:
        variable.assign(value.astype(variable.dtype))
    return len(assignments)


def read_torch_file(path):
    """The state dict of a PyTorch or safetensors file (dplg_tf.storage.checkpoints)."""
    from dplg_tf.storage.checkpoints import read_state_dict

    return read_state_dict(path)

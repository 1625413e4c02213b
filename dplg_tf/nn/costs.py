"""Parameters and multiply-adds of the model, counted from the traced graph.

MACs are read off the TensorFlow graph of one forward pass at a fixed
image size: Conv2D, depthwise conv, MatMul, BatchMatMul and Einsum ops, each
from its static shapes (a dilated conv counts its real output, not the
padded space-to-batch form TF runs it in). Element-wise work (BatchNorm, ReLU, softmax, pooling)
is left out, as is usual for such tables. `python -m dplg_tf.cli.costs
--backbone=resnet50 --image_size=512` prints the table of every head.
"""

import numpy as np
import tensorflow as tf

from dplg_tf import config as config_lib
from dplg_tf.nn.heads import HEADS
from dplg_tf.nn.model import build_dplg


def _dims(tensor):
    return [int(d) for d in tensor.shape]


def _einsum_macs(op):
    equation = op.get_attr("equation").decode()
    lhs = equation.split("->")[0].split(",")
    sizes = {}
    for spec, tensor in zip(lhs, op.inputs):
        for letter, size in zip(spec, _dims(tensor)):
            sizes[letter] = size
    return int(np.prod(list(sizes.values()), dtype=np.int64))


def _op_macs(op):
    kind = op.type
    if kind in ("Conv2D", "DepthwiseConv2dNative"):
        out = _dims(op.outputs[0])
        consumers = op.outputs[0].consumers()
        if len(consumers) == 1 and consumers[0].type == "BatchToSpaceND":
            out = _dims(consumers[0].outputs[0])  # dilated conv: drop the padding
        kernel = _dims(op.inputs[1])  # (kh, kw, cin, cout or multiplier)
        per_output = kernel[0] * kernel[1] * (kernel[2] if kind == "Conv2D" else 1)
        return int(np.prod(out, dtype=np.int64)) * per_output
    if kind == "MatMul":
        a = _dims(op.inputs[0])
        k = a[0] if op.get_attr("transpose_a") else a[1]
        return int(np.prod(_dims(op.outputs[0]), dtype=np.int64)) * k
    if kind in ("BatchMatMulV2", "BatchMatMulV3", "BatchMatMul"):
        a = _dims(op.inputs[0])
        k = a[-2] if op.get_attr("adj_x") else a[-1]
        return int(np.prod(_dims(op.outputs[0]), dtype=np.int64)) * k
    if kind == "Einsum":
        return _einsum_macs(op)
    return 0


def count_macs(model, height, width, scope_of=None, channels=3):
    """MACs of one forward pass of `model` on a (1, height, width, channels) input.

    With `scope_of`, a function from an op name to a group name, returns a
    dict of MACs per group instead of the total.
    """
    spec = tf.TensorSpec((1, height, width, channels), tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    totals = {}
    for op in graph.get_operations():
        macs = _op_macs(op)
        if macs:
            key = scope_of(op.name) if scope_of else "total"
            totals[key] = totals.get(key, 0) + macs
    return totals if scope_of else totals.get("total", 0)


def _scope(op_name, backbone_name):
    parts = op_name.split("/")
    inside = len(parts) > 1 and parts[1].startswith(backbone_name)
    return "backbone" if inside else "head"


def _backbone(model):
    """The nested backbone model inside a descriptor model."""
    return next(layer for layer in model.layers if hasattr(layer, "layers"))


def _sub_params(model):
    return sum(int(np.prod(w.shape)) for w in _backbone(model).weights)


def cost_table(backbone="resnet50", size=512, heads=HEADS, local_dim=None):
    """Rows of (head, backbone params, head params, backbone GMACs, head GMACs)."""
    rows = []
    for head in heads:
        c = config_lib.base_config()
        c.model.backbone = backbone
        c.model.head = head
        if local_dim:
            c.model.local_dim = local_dim
        model = build_dplg(c)
        bb_name = _backbone(model).name
        macs = count_macs(model, size, size, scope_of=lambda n: _scope(n, bb_name))
        total_params = model.count_params()
        bb_params = _sub_params(model)
        rows.append(dict(head=head, backbone_params=bb_params,
                         head_params=total_params - bb_params,
                         backbone_gmacs=macs.get("backbone", 0) / 1e9,
                         head_gmacs=macs.get("head", 0) / 1e9))
        del model
    return rows


def markdown(rows, backbone, size):
    lines = ["| head | head params (M) | head GMACs | total params (M) | total GMACs "
             "| vs gem (MACs) |",
             "|---|---:|---:|---:|---:|---:|"]
    base = next((r for r in rows if r["head"] == "gem"), rows[0])
    base_total = base["backbone_gmacs"] + base["head_gmacs"]
    for r in rows:
        total = r["backbone_gmacs"] + r["head_gmacs"]
        lines.append(
            f"| {r['head']} | {r['head_params'] / 1e6:.2f} | {r['head_gmacs']:.2f} "
            f"| {(r['head_params'] + r['backbone_params']) / 1e6:.2f} | {total:.2f} "
            f"| {total / base_total:.2f}x |")
    r = rows[0]
    lines.append("")
    lines.append(f"Backbone {backbone} (to conv5, no classifier) at {size}x{size}: "
                 f"{r['backbone_params'] / 1e6:.2f} M parameters, "
                 f"{r['backbone_gmacs']:.2f} GMACs.")
    return "\n".join(lines)

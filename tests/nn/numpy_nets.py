"""Forward passes in NumPy (float64) straight from PyTorch state dicts, for tests.

Written from the networks' definitions, not from dplg_tf's Keras code:
torchvision's ResNet v1.5 (symmetric padding k // 2, the stride on the 3x3,
max pool padded with -inf) and EfficientNet-Lite as its PyTorch port runs
it (TensorFlow 'same' padding: the odd pixel after, ReLU6, no SE). Images
are NHWC; weights are torch's OIHW.
"""

import math

import numpy as np


def conv(x, w, stride=1, pad=(0, 0, 0, 0), groups=1):
    """x (N, H, W, C); w (O, C/groups, k, k); pad (top, bottom, left, right)."""
    x = np.pad(x, ((0, 0), pad[:2], pad[2:], (0, 0)))
    n, h, wd, c = x.shape
    o, cg, k, _ = w.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, oh, ow, o))
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            if groups == 1:
                out += patch @ w[:, :, i, j].T
            else:  # depthwise: one input channel an output channel
                out += patch * w[:, 0, i, j]
    return out


def bn(x, state, name, eps):
    g, b = state[f"{name}.weight"], state[f"{name}.bias"]
    m, v = state[f"{name}.running_mean"], state[f"{name}.running_var"]
    return (x - m) / np.sqrt(v + eps) * g + b


def relu(x):
    return np.maximum(x, 0)


def max_pool_3x3_s2(x):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    h, w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    return np.max([x[:, i:i + 2 * h - 1:2, j:j + 2 * w - 1:2]
                   for i in range(3) for j in range(3)], axis=0)


def resnet_v1_5(state, x, blocks=(3, 4, 6, 3)):
    """torchvision ResNet: (X4 = layer3 output, X5 = layer4 output, logits)."""
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    x = relu(bn(conv(x, s["conv1.weight"], 2, (3, 3, 3, 3)), s, "bn1", 1e-5))
    x = max_pool_3x3_s2(x)
    taps = []
    for stage, count in enumerate(blocks, start=1):
        for b in range(count):
            p = f"layer{stage}.{b}"
            stride = 2 if b == 0 and stage > 1 else 1
            y = relu(bn(conv(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1", 1e-5))
            y = relu(bn(conv(y, s[f"{p}.conv2.weight"], stride, (1, 1, 1, 1)), s, f"{p}.bn2",
                        1e-5))
            y = bn(conv(y, s[f"{p}.conv3.weight"]), s, f"{p}.bn3", 1e-5)
            if f"{p}.downsample.0.weight" in s:
                x = bn(conv(x, s[f"{p}.downsample.0.weight"], stride), s, f"{p}.downsample.1",
                       1e-5)
            x = relu(y + x)
        taps.append(x)
    logits = taps[-1].mean(axis=(1, 2)) @ s["fc.weight"].T + s["fc.bias"] if "fc.weight" in s \
        else None
    return taps[2], taps[3], logits


def _same(size, k, stride):
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _conv_same(x, w, stride=1, groups=1):
    k = w.shape[-1]
    return conv(x, w, stride, _same(x.shape[1], k, stride) + _same(x.shape[2], k, stride),
                groups)


def relu6(x):
    return np.clip(x, 0, 6)


# Lite's stages: (output channels at width 1, stride of the first block); a stage
# starts at the first block whose output width differs from its input's
LITE_STRIDES = ((16, 1), (24, 2), (40, 2), (80, 2), (112, 1), (192, 2), (320, 1))


def efficientnet_lite(state, x):
    """EfficientNet-Lite from `_blocks.N.*` names: (last stride-16 block, head, logits)."""
    s = {k: np.asarray(v, np.float64) for k, v in state.items()}
    x = relu6(bn(_conv_same(x, s["_conv_stem.weight"], 2), s, "_bn0", 1e-3))
    count = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("_blocks."))
    stage, x4 = -1, None
    for i in range(count):
        p = f"_blocks.{i}"
        inputs = x
        out = s[f"{p}._project_conv.weight"].shape[0]
        stride = 1
        if out != inputs.shape[-1]:
            stage += 1
            stride = LITE_STRIDES[stage][1]
        if f"{p}._expand_conv.weight" in s:
            x = relu6(bn(_conv_same(x, s[f"{p}._expand_conv.weight"]), s, f"{p}._bn0", 1e-3))
        x = relu6(bn(_conv_same(x, s[f"{p}._depthwise_conv.weight"], stride, groups=x.shape[-1]),
                     s, f"{p}._bn1", 1e-3))
        x = bn(_conv_same(x, s[f"{p}._project_conv.weight"]), s, f"{p}._bn2", 1e-3)
        if stride == 1 and inputs.shape[-1] == out:
            x = x + inputs
        if stage == 4:  # the 112-channel stage, the last at stride 16
            x4 = x
    x5 = relu6(bn(_conv_same(x, s["_conv_head.weight"]), s, "_bn1", 1e-3))
    logits = x5.mean(axis=(1, 2)) @ s["_fc.weight"].T + s["_fc.bias"]
    return x4, x5, logits

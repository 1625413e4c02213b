"""Drawing an attention map (B, H4, W4) over its image: the one renderer behind
TensorBoard's attention images, dplg-eval's figures, the search page and the
demo's text map; and its entropy."""

import numpy as np

_SHADES = " .:-=+*#%@"


def entropy(attention):
    """The normalised entropy of each map of `attention` [B, H, W] (or [H, W])
    -> [B]: 1 for a uniform map, 0 for one position."""
    a = np.asarray(attention, np.float64)
    a = a.reshape((-1, a.shape[-2] * a.shape[-1]))
    a = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-12)
    h = -np.sum(np.where(a > 0, a * np.log(np.maximum(a, 1e-300)), 0.0), axis=1)
    return h / max(np.log(a.shape[1]), 1e-12) if a.shape[1] > 1 else np.ones(len(a))


def normalised(attention):
    """The map scaled to [0, 1] (min to max), float64."""
    a = np.asarray(attention, np.float64)
    return (a - a.min()) / max(a.max() - a.min(), 1e-12)


def heat(attention, height, width):
    """The normalised map upsampled (bilinear) to height x width, in [0, 1]."""
    from PIL import Image

    a = (normalised(attention) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(a).resize((width, height), Image.Resampling.BILINEAR),
                      np.float64) / 255.0


def colour(values):
    """A blue-cyan-yellow-red ramp of values in [0, 1] -> RGB in [0, 1] (jet-like)."""
    v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)[..., None]
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.concatenate([red, green, blue], axis=-1)


def overlay(image, attention, weight=0.5):
    """RGB float image in [0, 1]: the image (uint8 or float in [0, 255]) with
    the coloured attention map blended over it."""
    image = np.asarray(image, np.float64)
    h, w = image.shape[:2]
    return np.clip((1 - weight) * image / 255.0 + weight * colour(heat(attention, h, w)), 0, 1)


def side_by_side(images, attention):
    """[B, H, 2W, 3] float in [0, 1]: each image beside its overlay (TensorBoard)."""
    images = np.asarray(images, np.float64)
    return np.stack([np.concatenate([np.clip(im / 255.0, 0, 1), overlay(im, a)], axis=1)
                     for im, a in zip(images, np.asarray(attention))])


def ascii_map(attention):
    """The map as text, one character per X4 cell (dark = low)."""
    a = normalised(attention)
    return "\n".join("".join(_SHADES[int(v * (len(_SHADES) - 1))] for v in row) for row in a)

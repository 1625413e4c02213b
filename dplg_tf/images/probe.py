"""The probe image: a fixed generated picture whose descriptor identifies a
model (every descriptor file carries it)."""

import io

import numpy as np


def facade_image(height, width, seed=0):
    """A textured facade (windows on a wall) over a noisy sky, uint8 RGB."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    sky = np.linspace(200, 120, height)[:, None, None] * np.array([0.7, 0.85, 1.0])
    img[:] = sky + rng.normal(0, 6, (height, width, 3))
    top, left = height // 4, width // 5
    bottom, right = height - height // 8, width - width // 5
    wall = np.array(rng.uniform(90, 200, 3))
    img[top:bottom, left:right] = wall
    step_y, step_x = max(4, (bottom - top) // 6), max(4, (right - left) // 7)
    for y in range(top + step_y // 3, bottom - step_y // 2, step_y):
        for x in range(left + step_x // 3, right - step_x // 2, step_x):
            img[y:y + step_y // 2, x:x + step_x // 2] = wall * 0.35
    img[top - height // 10:top, left:right] = wall * 0.6  # roof line
    return np.clip(img, 0, 255).astype(np.uint8)


def probe_image():
    """A fixed generated image whose descriptor identifies a model."""
    return facade_image(160, 224, seed=12345)


def probe_bytes():
    """The probe image as PNG (lossless: the same pixels everywhere)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(probe_image()).save(buf, "PNG")
    return buf.getvalue()

"""Host-side decoding (images.decode): shrinking while decoding, and what a
large image within the limits costs."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dplg_tf import images

_PEAK = r"""
import resource, sys
sys.path.insert(0, "benchmarks")
from serving import png_bomb
from dplg_tf import images

bomb = png_bomb(6300)                 # 39.7 M pixels, ~130 KB: within the default limits
images.decode(png_bomb(64), max_side=512)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = images.decode(bomb, max_side=512)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert out.shape == (512, 512, 3) and out[5, 5].tolist() == [90, 120, 30], out[5, 5]
print(len(bomb), (after - before) // 1024)
"""


def _encoded(pixels, kind, mode="RGB"):
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode == "P":
        image = image.quantize(64)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(buf, kind, quality=95) if kind == "JPEG" else image.save(buf, kind)
    return buf.getvalue()


@pytest.mark.parametrize("kind,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P"),
                                       ("PNG", "L"), ("PNG", "RGBA"), ("GIF", "P")])
def test_a_shrunk_decode_is_the_full_decode_resized(kind, mode):
    pixels = images.facade_image(600, 900, 3)
    data = _encoded(pixels, kind, mode)
    full = images.decode(data)
    small = images.decode(data, max_side=300)
    assert small.shape == (200, 300, 3) and small.dtype == np.uint8
    resized = np.asarray(Image.fromarray(full).resize((300, 200), Image.Resampling.BILINEAR))
    # JPEG is read at a quarter of its size first; the others resize the same pixels
    assert np.abs(small.astype(float) - resized).mean() < (6 if kind == "JPEG" else 2)
    assert images.decode(data, max_side=2000).shape == full.shape   # never enlarged


def test_a_png_bomb_costs_one_frame_when_shrunk():
    """A ~130 KB PNG of 6300x6300 shrunk to 512 a side: one RGBX frame (159 MB)
    and little more; decoding it whole and resizing the array cost 530 MB."""
    proc = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True,
                          timeout=300, cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, grown_mb = map(int, proc.stdout.split()[-2:])
    assert size < 200_000
    assert grown_mb < 250, f"decoding the bomb raised the peak by {grown_mb} MB"

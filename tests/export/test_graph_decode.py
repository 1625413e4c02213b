"""The SavedModel's own decoding (export.graph_decode): the memory a large
image within the limits costs, and the same pixels as the wider path."""

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np

from conftest import image_bytes

_PEAK = r"""
import resource, sys
sys.path.insert(0, "benchmarks")
import tensorflow as tf
from serving import png_bomb
from dplg_tf.export import graph_decode

bomb = png_bomb(6300)                         # 39.7 M pixels: within the 40 M limit

@tf.function
def describe_input(data):
    return graph_decode.limit_side(graph_decode.decode(data, 40_000_000, 8), 1024)

import io
from PIL import Image
buf = io.BytesIO(); Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, "PNG")
describe_input(tf.constant(buf.getvalue()))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = describe_input(tf.constant(bomb)).numpy()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert out.shape == (1024, 1024, 3) and abs(float(out[5, 5, 1]) - 120.0) < 1e-3, out[5, 5]
print(len(bomb), (after - before) // 1024)
"""


def test_a_png_bomb_within_the_limits_costs_little_memory():
    """A ~130 KB PNG of 39.7 M pixels (within max_pixels) is decoded and cut
    to 1024 a side with one uint8 copy of it (119 MB) and little more: the
    uint16 decode, the float32 copy and both branches of the resize cost
    over 600 MB more before."""
    proc = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                          cwd=os.path.join(os.path.dirname(__file__), "..", ".."))
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, grown_mb = map(int, proc.stdout.split()[-2:])
    assert size < 200_000
    assert grown_mb < 300, f"decoding the bomb raised the peak by {grown_mb} MB"


def _png16(rows):
    """A 16-bit RGB PNG of `rows` [h, w, 3] uint16."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))

    h, w, _ = rows.shape
    raw = b"".join(b"\x00" + rows[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_decoding_keeps_the_top_byte_of_16_bit_pngs_and_8_bit_images_as_they_are():
    import tensorflow as tf
    from PIL import Image

    from dplg_tf.export import graph_decode

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (21, 34, 3), dtype=np.uint16)
    got = graph_decode.decode(tf.constant(_png16(wide)), 10 ** 6, 8).numpy()
    np.testing.assert_array_equal(got, (wide >> 8).astype(np.uint8))
    for fmt in ("PNG", "BMP"):
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        np.testing.assert_array_equal(
            graph_decode.decode(tf.constant(buf.getvalue()), 10 ** 6, 8).numpy(), pixels)
    jpeg = image_bytes(120, 160)
    np.testing.assert_array_equal(
        graph_decode.decode(tf.constant(jpeg), 10 ** 6, 8).numpy(),
        tf.io.decode_jpeg(jpeg, channels=3).numpy())


def test_the_side_limit_resizes_the_uint8_pixels_as_float32_ones():
    import tensorflow as tf

    from dplg_tf.export import graph_decode

    pixels = np.random.default_rng(1).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    got = graph_decode.limit_side(tf.constant(pixels), 256).numpy()
    want = tf.image.resize(tf.constant(pixels, tf.float32), (199, 256), antialias=True).numpy()
    assert got.dtype == np.float32 and got.shape == (199, 256, 3)
    np.testing.assert_array_equal(got, want)
    same = graph_decode.limit_side(tf.constant(pixels[:100, :200]), 256).numpy()
    np.testing.assert_array_equal(same, pixels[:100, :200].astype(np.float32))

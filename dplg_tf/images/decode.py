"""Reading image files (local paths or pyarrow-filesystem URIs) and decoding
them on the host, each checked against the limits first."""

import io
import os

import numpy as np

from dplg_tf.images.headers import ImageError, check_bytes
from dplg_tf.images.limits import DEFAULT_LIMITS
from dplg_tf.images.listing import display_name

def read_bytes(path, limits=DEFAULT_LIMITS):
    """The bytes of an image file (a path, or a URI any pyarrow filesystem reads:
    file://, s3://, gs://...), checked; ImageError('unreadable') if it cannot be read."""
    if "://" in str(path):
        return _read_uri(path, limits)
    try:
        size = os.path.getsize(path)
        _check_file_size(display_name(path), size, limits)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError("unreadable", f"{display_name(path)} cannot be read: "
                         f"{e.strerror or e}.") from None
    check_bytes(data, limits)
    return data


def _check_file_size(name, size, limits):
    if size is not None and size > limits.max_request_mb * 1024 * 1024:
        raise ImageError("too large", f"{name} is {size} bytes; the limit is "
                         f"{limits.max_request_mb} MiB.")


def _read_uri(uri, limits):
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
        _check_file_size(uri, fs.get_file_info(inner).size, limits)
        with fs.open_input_stream(inner) as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise ImageError("unreadable", f"{uri} cannot be read: {e}.") from None
    check_bytes(data, limits)
    return data


def decode(data, limits=DEFAULT_LIMITS, bbx=None, max_side=None):
    """uint8 [H, W, 3] RGB of checked image bytes (first frame), cropped to `bbx`.
    With `max_side`, shrunk (aspect kept, bilinear) to at most that a side while
    decoding: one full-size frame for PNG, GIF and BMP, a JPEG read at 1/2, 1/4
    or 1/8 of its size, and no full-size copies after it."""
    from PIL import Image

    check_bytes(data, limits)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if bbx is not None:
                img = img.convert("RGB").crop(bbx)
            if max_side is not None:
                if img.mode not in ("RGB", "RGBA", "L", "LA"):   # palettes resize by nearest
                    img = img.convert("RGB")
                img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError("undecodable", f"The image cannot be decoded: {e}.") from None

def load(path, *, limits=DEFAULT_LIMITS, bbx=None):
    """uint8 [H, W, 3] RGB of an image file, checked before decoding."""
    return decode(read_bytes(path, limits), limits, bbx)

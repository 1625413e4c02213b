"""Image sizes read from the headers, before anything is decoded.

The size that counts is that of the decoded frames: for a GIF, every
frame's own descriptor is read (a 100x100 screen may hold a 10000x10000
frame, and the decoder allocates each frame it reads)."""

import struct

from dplg_tf.errors import UserError
from dplg_tf.images.limits import DEFAULT_LIMITS

class ImageError(UserError):
    """An image that is refused; `reason` is one of REASONS."""

    REASONS = ("undecodable", "too large", "too small", "unreadable")

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason

def _jpeg_size(data):
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:          # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB,
                      0xCD, 0xCE, 0xCF):
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return height, width, height * width
        if length < 2:
            return None
        pos += 2 + length
    return None

def _gif_size(data):
    """(height, width, pixels) over every frame of a GIF: the frames' extent
    and the sum of the pixels the decoder allocates for them."""
    if len(data) < 13:
        return None
    screen_w, screen_h, packed = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 * 2 ** ((packed & 7) + 1) if packed & 0x80 else 0)
    height, width, pixels = screen_h, screen_w, screen_h * screen_w
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:           # trailer
            break
        if block == 0x2C:           # image descriptor
            if pos + 10 > len(data):
                return None
            left, top, w, h, flags = struct.unpack("<HHHHB", data[pos + 1:pos + 10])
            height, width = max(height, top + h), max(width, left + w)
            pixels += w * h
            pos += 10 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        elif block == 0x21:         # extension: label, then sub-blocks
            pos += 2
        else:
            return None
        while pos < len(data) and data[pos]:   # sub-blocks up to a zero length
            pos += 1 + data[pos]
        pos += 1
    return height, width, pixels

def frame_size(data):
    """(height, width, pixels) that decoding `data` produces, read from the
    header (every frame of a GIF); None for other formats or cut headers."""
    data = bytes(data[:1 << 20]) if not isinstance(data, bytes) else data
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return height, width, height * width
    if data[:4] == b"GIF8":
        return _gif_size(data)
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(height), abs(width), abs(height * width)
    return None

def _check_size(height, width, pixels, limits):
    if pixels > limits.max_pixels:
        raise ImageError("too large", f"The image's decoded frames hold {pixels} pixels "
                         f"({height}x{width}); the limit is {limits.max_pixels}.")
    if min(height, width) < limits.min_side:
        raise ImageError("too small", f"The image is {height}x{width} pixels; the shorter "
                         f"side must be at least {limits.min_side}.")

def check_bytes(data, limits=DEFAULT_LIMITS):
    """(height, width) of encoded image bytes, or ImageError, without decoding."""
    size = frame_size(data)
    if size is None:
        raise ImageError("undecodable", "The bytes are not a JPEG, PNG, GIF or BMP image "
                         "(or the header is cut short).")
    _check_size(*size, limits)
    return size[0], size[1]

def check_array(shape, limits=DEFAULT_LIMITS):
    """ImageError unless an [H, W, 3] image of `shape` is within the limits."""
    if len(shape) != 3 or shape[2] != 3:
        raise ImageError("undecodable", f"The image must have shape [H, W, 3], got "
                         f"{list(shape)}.")
    height, width = int(shape[0]), int(shape[1])
    _check_size(height, width, height * width, limits)


def refusal_reason(message):
    """The ImageError reason of a refusal sentence from any of our checks (the
    host's, the graph's or a server's): they share the phrases tested here."""
    if "limit" in message:
        return "too large"
    if "shorter side" in message:
        return "too small"
    return "undecodable"

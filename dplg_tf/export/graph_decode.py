"""Image decoding inside the SavedModel's graph (what TF Serving runs).

`decode` reads the decoded size from the header before anything is decoded
(JPEG's frame header, PNG's IHDR, BMP's info header, and for a GIF every
frame's descriptor, since a small screen may hold a large frame and the
decoder allocates each frame) and refuses images over the pixel limit or
under the minimum side with InvalidArgument.
"""

import tensorflow as tf

_PAD = b"\0" * 16  # reads near the end of the data see zeros, not an error


def _bytes_at(data, offset, length):
    """int64 [length] of the bytes at `offset` (zeros past the end)."""
    raw = tf.io.decode_raw(tf.strings.substr(data, offset, length), tf.uint8)
    return tf.cast(raw, tf.int64)


def _uint(raw, offset, length, big_endian):
    order = range(length) if big_endian else reversed(range(length))
    value = tf.constant(0, tf.int64)
    for i in order:
        value = value * 256 + raw[offset + i]
    return value


def _gif_frames(data):
    """(height, width, pixels) over all frames of a GIF, by walking its blocks."""
    padded = tf.strings.join([data, _PAD])
    n = tf.cast(tf.strings.length(data), tf.int64)
    head = _bytes_at(padded, 0, 13)
    screen_w, screen_h = _uint(head, 6, 2, False), _uint(head, 8, 2, False)
    packed = head[10]
    table = tf.where(packed >= 128, 3 * tf.bitwise.left_shift(
        tf.constant(2, tf.int64), packed % 8), 0)

    def body(pos, in_blocks, height, width, pixels, done):
        b = _bytes_at(padded, pos, 10)
        # inside sub-blocks: a zero length ends them, else skip the block
        sub_pos = tf.where(b[0] == 0, pos + 1, pos + 1 + b[0])
        sub_mode = b[0] != 0
        # at a block start: image descriptor, extension, or the end
        is_image, is_ext = b[0] == 0x2C, b[0] == 0x21
        left, top = _uint(b, 1, 2, False), _uint(b, 3, 2, False)
        w, h, flags = _uint(b, 5, 2, False), _uint(b, 7, 2, False), b[9]
        local = tf.where(flags >= 128, 3 * tf.bitwise.left_shift(
            tf.constant(2, tf.int64), flags % 8), 0)
        start_pos = tf.where(is_image, pos + 11 + local, pos + 2)
        image_here = tf.logical_and(tf.logical_not(in_blocks), is_image)
        height = tf.where(image_here, tf.maximum(height, top + h), height)
        width = tf.where(image_here, tf.maximum(width, left + w), width)
        pixels = tf.where(image_here, pixels + w * h, pixels)
        done = tf.logical_and(tf.logical_not(in_blocks), tf.logical_not(
            tf.logical_or(is_image, is_ext)))
        return (tf.where(in_blocks, sub_pos, start_pos),
                tf.where(in_blocks, sub_mode, tf.logical_not(done)),
                height, width, pixels, done)

    _, _, height, width, pixels, _ = tf.while_loop(
        lambda pos, _m, _h, _w, _p, done: tf.logical_and(pos < n, tf.logical_not(done)),
        body, (13 + table, tf.constant(False), screen_h, screen_w, screen_h * screen_w,
               tf.constant(False)), parallel_iterations=1)
    return height, width, pixels


def header_size(data):
    """(height, width, pixels) int64 of the decoded frames of a JPEG, PNG, GIF or
    BMP, from its header; InvalidArgument for other or too short data."""
    magic = tf.strings.substr(data, 0, 8)
    n = tf.strings.length(data)
    is_jpeg = tf.strings.substr(magic, 0, 3) == b"\xff\xd8\xff"
    is_png = tf.logical_and(magic == b"\x89PNG\r\n\x1a\n", n >= 24)
    is_gif = tf.logical_and(tf.strings.substr(magic, 0, 4) == b"GIF8", n >= 13)
    is_bmp = tf.logical_and(tf.strings.substr(magic, 0, 2) == b"BM", n >= 26)
    known = tf.reduce_any(tf.stack([is_jpeg, is_png, is_gif, is_bmp]))
    check = tf.debugging.Assert(known, [
        "image_bytes is not a JPEG, PNG, GIF or BMP image (or is truncated)."])
    with tf.control_dependencies([check]):

        def jpeg():
            shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
            return shape[0], shape[1], shape[0] * shape[1]

        def png():
            raw = _bytes_at(data, 16, 8)
            h, w = _uint(raw, 4, 4, True), _uint(raw, 0, 4, True)
            return h, w, h * w

        def bmp():
            raw = _bytes_at(data, 18, 8)
            w, h = _uint(raw, 0, 4, False), _uint(raw, 4, 4, False)
            h = tf.where(h >= 2 ** 31, 2 ** 32 - h, h)  # negative when top-down
            w = tf.where(w >= 2 ** 31, 2 ** 32 - w, w)
            return h, w, h * w

        return tf.case([(is_jpeg, jpeg), (is_png, png), (is_gif, lambda: _gif_frames(data))],
                       default=bmp, exclusive=False)


def decode(data, max_pixels, min_side):
    """Bytes -> uint8 [H, W, 3], refusing images over `max_pixels` (of all decoded
    frames) or under `min_side`, both before decoding."""
    height, width, pixels = header_size(data)
    large = tf.debugging.Assert(pixels <= max_pixels, [
        "The image's decoded frames hold", pixels, "pixels (", height, "x", width,
        "); the limit is", max_pixels])
    small = tf.debugging.Assert(tf.minimum(height, width) >= min_side, [
        "The image is", height, "x", width, "pixels; the shorter side must be at least",
        min_side])
    with tf.control_dependencies([large, small]):
        # a 16-bit PNG keeps its top byte; decoded as uint8 directly, with no
        # wider copy of a large image (the same values as uint16 >> 8)
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def limit_side(image, max_side):
    """Downscale so the longest side is at most `max_side` (never upscale); no side
    falls under 1 pixel."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.minimum(1.0, max_side / tf.reduce_max(shape))
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
    # only the branch taken runs, and a large image is resized from its uint8
    # pixels (the same numbers as from float32, without a 4-byte copy of it)
    return tf.cond(scale < 1.0, lambda: tf.image.resize(image, new, antialias=True),
                   lambda: tf.cast(image, tf.float32))

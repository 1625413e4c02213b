"""Images on the host side: the limits, header checks, decoding, listing and
the probe image.

Every path that takes images (the server, the client, the builder, the
index and the evaluation) checks them here with the same `Limits`, before
anything is decoded. The size that counts is that of the decoded frames:
for a GIF, every frame's own descriptor is read (a 100x100 screen may hold a
10000x10000 frame, and the decoder allocates each frame it reads).
"""

import dataclasses
import io
import os
import struct

import numpy as np

from dplg_tf.errors import InputNotFound, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one request's work; the README's "Limits" table lists them."""

    max_images: int = 64              # images in one serving_default request
    max_scales: int = 8               # scales in one multiscale request
    max_scale: float = 2.0            # largest scale (applied after max_image_side)
    max_pixels: int = 40_000_000      # pixels of an image's decoded frames
    min_side: int = 16                # shorter side, in pixels
    max_request_mb: int = 64          # bytes of one gRPC message

    def check_scales(self, scales):
        scales = [float(s) for s in scales]
        if not scales or len(scales) > self.max_scales or any(
                not (0.0 < s <= self.max_scale) for s in scales):
            raise UserError(f"Scales must be 1 to {self.max_scales} values in "
                             f"(0, {self.max_scale:g}], got {scales}.")
        return scales


DEFAULT_LIMITS = Limits()

# flag name -> (Limits field, help), shared by every command that takes images
LIMIT_FLAGS = {
    "max_images_per_request": ("max_images", "Images in one serving_default request."),
    "max_scales": ("max_scales", "Scales in one multiscale request."),
    "max_scale": ("max_scale", "Largest scale a request may ask for."),
    "max_pixels": ("max_pixels", "Pixels of an image's decoded frames (all GIF frames)."),
    "min_image_side": ("min_side", "Shorter side of an image, in pixels."),
    "max_request_mb": ("max_request_mb", "Largest gRPC message, in MiB."),
}


class ImageError(UserError):
    """An image that is refused; `reason` is one of REASONS."""

    REASONS = ("undecodable", "too large", "too small", "unreadable")

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------- headers

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


def read_bytes(path, limits=DEFAULT_LIMITS):
    """The bytes of an image file, checked; ImageError('unreadable') if it cannot be read."""
    try:
        size = os.path.getsize(path)
        if size > limits.max_request_mb * 1024 * 1024:
            raise ImageError("too large", f"{display_name(path)} is {size} bytes; the limit "
                             f"is {limits.max_request_mb} MiB.")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError("unreadable", f"{display_name(path)} cannot be read: "
                         f"{e.strerror or e}.") from None
    check_bytes(data, limits)
    return data


def decode(data, limits=DEFAULT_LIMITS, bbx=None):
    """uint8 [H, W, 3] RGB of checked image bytes (first frame), cropped to `bbx`."""
    from PIL import Image

    check_bytes(data, limits)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if bbx is not None:
                img = img.crop(bbx)
            return np.asarray(img, np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError("undecodable", f"The image cannot be decoded: {e}.") from None


def load(path, *, limits=DEFAULT_LIMITS, bbx=None):
    """uint8 [H, W, 3] RGB of an image file, checked before decoding."""
    return decode(read_bytes(path, limits), limits, bbx)


# ----------------------------------------------------------------- listing

def display_name(path):
    """A path as printable text (undecodable bytes as escapes, newlines escaped)."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def list_images(paths, problems=None, extensions=IMAGE_EXTENSIONS):
    """Image files named or found under folders (recursively, sorted, each once).

    Symbolic-link loops and names that are not valid text are not followed
    or kept; each is appended to `problems` as (path, reason) when given.
    A named path that does not exist is an error.
    """
    files, seen_dirs = [], set()
    problems = problems if problems is not None else []

    def walk(folder):
        key = os.path.realpath(folder)
        if key in seen_dirs:
            problems.append((display_name(folder), "symbolic-link loop, not followed"))
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append((display_name(folder), f"unreadable: {e.strerror or e}"))
            return
        for entry in entries:
            if not is_text_name(entry.name):
                problems.append((display_name(entry.path), "name is not valid UTF-8"))
                continue
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError as e:       # e.g. too many levels of symbolic links
                problems.append((display_name(entry.path), f"unreadable: {e.strerror or e}"))
                continue
            if entry.is_symlink() and not (is_dir or is_file):
                problems.append((display_name(entry.path), "broken or looping symbolic link"))
            elif is_dir:
                walk(entry.path)
            elif is_file and entry.name.lower().endswith(extensions):
                files.append(entry.path)

    for path in paths:
        if os.path.isdir(path):
            walk(path)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise InputNotFound(f"{display_name(path)} is neither an image file nor "
                                    "a folder.")
    return files


def is_text_name(name):
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:      # surrogate escapes of undecodable bytes
        return False


# ------------------------------------------------------------- probe image

def probe_image():
    """A fixed generated image whose descriptor identifies a model."""
    from dplg_tf.data.synthetic import facade_image

    return facade_image(160, 224, seed=12345)


def probe_bytes():
    """The probe image as PNG (lossless: the same pixels everywhere)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(probe_image()).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------ describing

def tf_refusal(error):
    """Why a local SavedModel refused an image (its InvalidArgumentError), or None."""
    if type(error).__name__ == "InvalidArgumentError":
        from dplg_tf.errors import tf_error_message

        return tf_error_message(error)
    return None


def send_or_split(describe, blobs, refusal=tf_refusal):
    """[(row, None) or (None, reason)] per blob through `describe(list of bytes)
    -> rows`: a batch the model refuses is retried image by image; other
    errors (server gone, deadline) are raised."""
    try:
        return [(row, None) for row in describe(list(blobs))]
    except Exception as e:  # noqa: BLE001 - sorted by refusal()
        reason = refusal(e)
        if reason is None:
            raise
        if len(blobs) == 1:
            return [(None, reason)]
        return [row for blob in blobs for row in send_or_split(describe, [blob], refusal)]


def describe_files(describe, paths, batch_size=8, concurrency=4, limits=None,
                   progress=None, refusal=tf_refusal):
    """(names, descriptors [n, D], [(name, reason)]) of image files, through
    `describe(list of bytes) -> rows` (a Client's or a SavedModel's): each file
    is read and checked first, a batch the model refuses is retried image by
    image, and every bad image is reported, never fatal. Other errors (server
    gone, deadline) are raised."""
    import concurrent.futures

    limits = limits or DEFAULT_LIMITS
    blobs, errors = [], []
    for path in paths:
        try:
            blobs.append((path, read_bytes(path, limits)))
        except ImageError as e:
            errors.append((display_name(path), f"{e.reason}: {e}"))
            if progress is not None:
                progress.update(1)

    def send(batch):
        rows = send_or_split(describe, [b for _, b in batch], refusal)
        return [(p, row, error) for (p, _), (row, error) in zip(batch, rows)]

    batches = [blobs[i:i + batch_size] for i in range(0, len(blobs), batch_size)]
    done = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        for batch, rows in zip(batches, pool.map(send, batches)):
            for path, row, error in rows:
                done[path] = (row, error)
            if progress is not None:
                progress.update(len(batch))
    names, descriptors = [], []
    for path, _ in blobs:
        row, error = done[path]
        if error is None:
            names.append(path)
            descriptors.append(row)
        else:
            errors.append((display_name(path), f"refused by the model: {error}"))
    dim = len(descriptors[0]) if descriptors else 0
    return names, np.asarray(descriptors, np.float32).reshape(len(names), dim), errors

"""Images on the host side: the limits, header checks, decoding, listing and
the probe image.

Every path that takes images (the server, the client, the builder, the
index, the evaluation and the extractor) checks them here with the same
`Limits`, before anything is decoded.

- limits:  Limits, DEFAULT_LIMITS and the flag table
- headers: decoded sizes from the headers (every GIF frame), ImageError
- decode:  reading files (paths or URIs) and decoding them
- listing: image files under folders, printable names
- probe:   the probe image that identifies a model
- attention: the one attention renderer (overlays, side by side, text)

Imports: dplg_tf.errors only. The names below are the package's API.
"""

from dplg_tf.images.decode import decode, load, read_bytes
from dplg_tf.images.headers import ImageError, check_array, check_bytes, frame_size, refusal_reason
from dplg_tf.images.limits import (DEFAULT_LIMITS, GRAPH_LIMITS, LIMIT_FLAGS, READ_LIMITS,
                                   Limits, check_positive_scales)
from dplg_tf.images.listing import (BUILDER_EXTENSIONS, IMAGE_EXTENSIONS, display_name,
                                    is_text_name, list_images)
from dplg_tf.images.probe import facade_image, probe_bytes, probe_image

__all__ = ["BUILDER_EXTENSIONS", "DEFAULT_LIMITS", "GRAPH_LIMITS", "IMAGE_EXTENSIONS", "LIMIT_FLAGS", "READ_LIMITS",
           "ImageError", "Limits", "check_array", "check_positive_scales", "check_bytes", "decode", "display_name",
           "facade_image", "frame_size", "is_text_name", "list_images", "load", "probe_bytes",
           "probe_image", "read_bytes", "refusal_reason"]

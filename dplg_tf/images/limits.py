"""The bounds on every input (README "Limits"): one table for the server, the
signatures, the client, the extractor and the builder."""

import dataclasses

from dplg_tf.errors import UserError

@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on one request's work; the README's "Limits" table lists them."""

    max_images: int = 64              # images in one serving_default request
    max_scales: int = 8               # scales in one multiscale request
    max_scale: float = 2.0            # largest scale (applied after max_image_side)
    max_pixels: int = 40_000_000      # pixels of an image's decoded frames
    max_request_pixels: int = 200_000_000   # pixels of all the images of one request
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


def check_positive_scales(scales):
    """Scales as floats, at least one, each finite and > 0: the check for a
    command that hands them to an exported model, which applies the bounds its
    export was given (dplg-export --max_scales, --max_scale)."""
    scales = [float(s) for s in scales]
    if not scales or not all(0.0 < s < float("inf") for s in scales):
        raise UserError(f"Scales must be finite numbers above 0, got {scales}.")
    return scales

# flag name -> (Limits field, help), shared by every command that takes images
LIMIT_FLAGS = {
    "max_images_per_request": ("max_images", "Images in one serving_default request."),
    "max_scales": ("max_scales", "Scales in one multiscale request."),
    "max_scale": ("max_scale", "Largest scale a request may ask for."),
    "max_pixels": ("max_pixels", "Pixels of an image's decoded frames (all GIF frames)."),
    "max_request_pixels": ("max_request_pixels", "Pixels of all the images of one request "
                           "(what decoding it allocates)."),
    "min_image_side": ("min_side", "Shorter side of an image, in pixels."),
    "max_request_mb": ("max_request_mb", "Largest gRPC message, in MiB."),
}


# the limits each kind of command takes flags for
GRAPH_LIMITS = ("max_images_per_request", "max_scales", "max_scale", "max_pixels",
                "max_request_pixels", "min_image_side")   # enforced inside the SavedModel (dplg-export)
READ_LIMITS = ("max_pixels", "min_image_side", "max_request_mb")   # reading image files

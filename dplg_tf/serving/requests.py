"""Checking a Predict request before any work: its tensors and its limits.

A TensorProto declares a shape and carries values; TensorFlow expands a
proto with one value to the whole declared shape, so a request of a few
bytes could ask for gigabytes. Here the declared element count is bounded
per input and must equal the count of values carried, before the tensor is
built. Then the signature's limits (dplg_tf.images.Limits) are checked on
the arrays: images per request, each image's header, the multiscale image's
pixels, the scales.
"""

import math

import grpc
import numpy as np

from dplg_tf import images


class ServingError(Exception):
    """An error with its gRPC status code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def _invalid(message):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


# dtype enum name -> (numpy dtype, the proto field that holds its values)
_KINDS = {
    "DT_STRING": (np.object_, "string_val"),
    "DT_UINT8": (np.uint8, "int_val"),
    "DT_FLOAT": (np.float32, "float_val"),
}


def element_limit(name, limits):
    """The most elements input `name` may declare."""
    return {"image_bytes": limits.max_images, "image": 3 * limits.max_pixels,
            "scales": limits.max_scales}.get(name, 1 << 20)


def tensor_from_proto(name, proto, spec, limits):
    """The numpy array of one input, after checking what the proto declares."""
    import tensorflow as tf

    try:
        got = tf.dtypes.as_dtype(proto.dtype).name
    except TypeError:
        got = f"type enum {proto.dtype}"
    from tensorflow.core.framework import types_pb2

    want = types_pb2.DataType.Name(spec.dtype.as_datatype_enum)
    if got != spec.dtype.name or want not in _KINDS:
        raise _invalid(f"Input {name!r} must be {spec.dtype.name}, got {got}.")
    if proto.tensor_shape.unknown_rank:
        raise _invalid(f"Input {name!r} must have a known shape.")
    dims = [d.size for d in proto.tensor_shape.dim]
    if spec.shape.rank is not None and len(dims) != spec.shape.rank:
        raise _invalid(f"Input {name!r} must have rank {spec.shape.rank} (shape "
                       f"{spec.shape}), got shape {dims}.")
    if any(d < 0 for d in dims):
        raise _invalid(f"Input {name!r} declares a negative dimension: shape {dims}.")
    for i, dim in enumerate(spec.shape):
        if dim is not None and dims[i] != dim:
            raise _invalid(f"Input {name!r} must have shape {spec.shape}, got {dims}.")
    count = math.prod(dims)
    limit = element_limit(name, limits)
    if count > limit:
        raise _invalid(f"Input {name!r} declares {count} elements (shape {dims}); the "
                       f"limit is {limit}.")
    np_dtype, field = _KINDS[want]
    if proto.tensor_content:
        carried = len(proto.tensor_content) // np.dtype(np_dtype).itemsize
        exact = len(proto.tensor_content) == count * np.dtype(np_dtype).itemsize
    else:
        carried = len(getattr(proto, field))
        exact = carried == count
    if not exact:
        raise _invalid(f"Input {name!r} declares shape {dims} ({count} elements) but "
                       f"carries {carried} values; send every value.")
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # noqa: BLE001 - any malformed proto is the client's error
        raise _invalid(f"Input {name!r} could not be read: {e}.") from None


def read_inputs(signature_name, specs, protos, limits):
    """{name: array} of a request's inputs for a signature with input `specs`."""
    missing = sorted(set(specs) - set(protos))
    extra = sorted(set(protos) - set(specs))
    if missing or extra:
        raise _invalid(f"Signature {signature_name!r} takes inputs {sorted(specs)}; "
                       f"missing {missing}, unexpected {extra}.")
    arrays = {name: tensor_from_proto(name, protos[name], spec, limits)
              for name, spec in specs.items()}
    check_limits(arrays, limits)
    return arrays


def check_limits(arrays, limits):
    """INVALID_ARGUMENT unless the inputs are within `limits` (before any work)."""
    if "image_bytes" in arrays:
        blobs = arrays["image_bytes"].ravel()
        if len(blobs) > limits.max_images:
            raise _invalid(f"A request may hold at most {limits.max_images} images; this "
                           f"one holds {len(blobs)}.")
        total = 0
        for i, blob in enumerate(blobs):
            try:
                images.check_bytes(blob, limits)
            except images.ImageError as e:
                raise _invalid(f"Image {i} of the request: {e}") from None
            total += images.frame_size(blob)[2]
        if total > limits.max_request_pixels:
            raise _invalid(f"The request's images hold {total} pixels together; the limit is "
                           f"{limits.max_request_pixels}: send fewer images per request.")
    if "image" in arrays:
        try:
            images.check_array(arrays["image"].shape, limits)
        except images.ImageError as e:
            raise _invalid(str(e)) from None
    if "scales" in arrays:
        scales = arrays["scales"].ravel()
        if not np.all(np.isfinite(scales)):
            raise _invalid(f"Scales must be finite numbers, got {scales.tolist()}.")
        try:
            limits.check_scales(scales)
        except ValueError as e:
            raise _invalid(str(e)) from None

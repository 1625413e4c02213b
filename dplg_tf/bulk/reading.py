"""The worker side of dplg-extract: read and check image bytes, then describe
them in same-size batches with a SavedModel (or through a server).

`read_rows` is the cheap CPU step (bytes and header checks, the same
Limits as the server); `BatchDescriber` decodes each image with the
SavedModel's `decode_limited`, groups the images by their size after the
max_image_side limit and sends each group through `describe_batch` (one
model call per scale), so nothing is padded. Models exported before these
functions existed are described image by image through serving_default.
Nothing here needs Ray; dplg_tf.bulk.job runs it on Ray Data.
"""

import os

import numpy as np

from dplg_tf import images

PROBE = "<dplg probe image>"


def read_bytes(path, limits):
    """Checked bytes of a local path or a URI any pyarrow filesystem reads."""
    if "://" not in path:
        return images.read_bytes(path, limits)
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        info = fs.get_file_info(inner)
        if info.size is not None and info.size > limits.max_request_mb * 1024 * 1024:
            raise images.ImageError("too large", f"{path} is {info.size} bytes; the limit "
                                    f"is {limits.max_request_mb} MiB.")
        with fs.open_input_stream(inner) as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise images.ImageError("unreadable", f"{path} cannot be read: {e}.") from None
    images.check_bytes(data, limits)
    return data


def read_rows(paths, limits):
    """(list of bytes or None, list of (status, reason) or None) for `paths`;
    the name PROBE stands for the probe image."""
    blobs, errors = [], []
    for path in paths:
        if path == PROBE:
            blobs.append(images.probe_bytes())
            errors.append(None)
            continue
        try:
            blobs.append(read_bytes(path, limits))
            errors.append(None)
        except images.ImageError as e:
            blobs.append(None)
            errors.append((e.reason, f"{e.reason}: {e}"))
    return blobs, errors


class BatchDescriber:
    """Describes image bytes in same-size batches with one SavedModel.

    `describe(blobs)` -> (descriptors [N, D] float32 with zeros for refused
    images, list of None or (status, reason)); `calls` and `described`
    count model calls and images, for the batching statistics."""

    def __init__(self, model, scales=None, batch_size=8, threads=None):
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(2)
        self.loaded = tf.saved_model.load(model)
        self.batched = hasattr(self.loaded, "describe_batch")
        own = self.loaded.scales.numpy().tolist() if hasattr(self.loaded, "scales") else None
        self.scales = [float(s) for s in (scales or own or _paper_scales())]
        self.batch_size = max(1, int(batch_size))
        self._default = self.loaded.signatures["serving_default"]
        self.dim = int(self._default.structured_outputs["global_descriptor"].shape[-1])
        self.calls = self.described = 0

    def describe(self, blobs):
        import tensorflow as tf

        out = np.zeros((len(blobs), self.dim), np.float32)
        errors = [None] * len(blobs)
        groups = {}
        for i, data in enumerate(blobs):
            try:
                if not self.batched:
                    out[i] = self._default(image_bytes=tf.constant([data]))[
                        "global_descriptor"].numpy()[0]
                    self.calls, self.described = self.calls + 1, self.described + 1
                    continue
                image = self.loaded.decode_limited(tf.constant(data))
            except tf.errors.InvalidArgumentError as e:
                errors[i] = _refused(e)
                continue
            groups.setdefault(tuple(image.shape), []).append((i, image))
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                part = members[start:start + self.batch_size]
                batch = tf.stack([image for _, image in part])
                rows = self.loaded.describe_batch(batch, tf.constant(self.scales, tf.float32))
                rows = rows["global_descriptor"].numpy()
                self.calls, self.described = self.calls + 1, self.described + len(part)
                for (i, _), row in zip(part, rows):
                    out[i] = row
        return out, errors


class ServerDescriber:
    """The same interface through dplg-serve or TF Serving (serving_default):
    the server decodes and batches; a refused batch is retried image by image."""

    def __init__(self, server, model_name="dplg", batch_size=8):
        from dplg_tf.retrieval.describers import Describer

        self.describer = Describer(server=server, model_name=model_name)
        self.batch_size = max(1, int(batch_size))
        self.dim = int(self.describer.probe().shape[0])
        self.calls = self.described = 0

    def describe(self, blobs):
        from dplg_tf.serving.client import refusal

        out = np.zeros((len(blobs), self.dim), np.float32)
        errors = [None] * len(blobs)

        def counted(batch):
            rows = self.describer.describe_bytes(batch)
            self.calls, self.described = self.calls + 1, self.described + len(batch)
            return rows

        for start in range(0, len(blobs), self.batch_size):
            stop = min(len(blobs), start + self.batch_size)
            rows = images.send_or_split(counted, blobs[start:stop], refusal)
            for i, (row, reason) in enumerate(rows, start):
                if reason is None:
                    out[i] = row
                else:
                    errors[i] = ("undecodable", f"refused by the model: {reason}")
        return out, errors


def _refused(error):
    from dplg_tf.errors import tf_error_message

    message = tf_error_message(error)
    status = "too large" if "limit" in message else (
        "too small" if "shorter side" in message else "undecodable")
    return status, f"{status}: refused by the model: {message}"


def _paper_scales():
    from dplg_tf.config import PAPER_SCALES

    return list(PAPER_SCALES)


def fingerprint(model):
    """The SavedModel's identity without TensorFlow: a hash of its
    fingerprint.pb (which holds checksums of the graph and the weights), or of
    saved_model.pb for exports without one."""
    import hashlib

    path = os.path.join(model, "fingerprint.pb")
    if not os.path.isfile(path):
        path = os.path.join(model, "saved_model.pb")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

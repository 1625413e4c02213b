"""The one source of descriptors: an exported SavedModel on disk or a server.

    describer = Describer(model="models/dplg")          # base path or version folder
    describer = Describer(server="127.0.0.1:8500")      # dplg-serve or TF Serving

Both give the same numbers through the same two signatures (DESIGN.md):
`describe_bytes` (serving_default: encoded images -> [N, D]) and
`multiscale` (one decoded image at the given scales). `describe_files`
reads, checks and describes image files in batches and reports the bad
ones; `describe_rows` is the bulk path (dplg-extract): a local SavedModel
decodes each image with `decode_limited` and describes images of one size
together with `describe_batch` (one model call per scale, nothing padded),
a server gets batches of `batch_size`. `probe()` is the model's descriptor
of the fixed probe image, which every descriptor file carries; `identity`
names the model (the SavedModel folder, or grpc://server/name/version).

`refusal(error)` is the one place that tells a refused image from a failure.
"""

import json

import numpy as np

from dplg_tf import images
from dplg_tf.errors import UserError, tf_error_message


class Describer:
    def __init__(self, model=None, server=None, model_name="dplg", model_version=None,
                 timeout=600.0, retries=4, limits=None, scales=None, batch_size=8,
                 threads=None):
        if bool(server) == bool(model):
            raise UserError("Give exactly one of --model (a SavedModel) or --server "
                             "(host:port).")
        self.limits = limits or images.DEFAULT_LIMITS
        self.batch_size = max(1, int(batch_size))
        self.calls = self.described = 0   # model calls and images of describe_rows
        self._probe = None
        if server:
            from dplg_tf.serving.client import Client

            if scales:
                raise UserError("Scales need --model: a server describes at its own scales.")
            self.client = Client(server, model_name, timeout, retries, version=model_version,
                                 max_message_mb=self.limits.max_request_mb)
            version = model_version or self._served_version(server, model_name)
            self.identity = f"grpc://{server}/{model_name}/{version}"
            self.concurrency, self.scales, self.batched = 4, None, False
            self.refinements = None   # a server does not say
        else:
            self.client = None
            self.concurrency = 1
            self._load(model, scales, threads)

    def _served_version(self, server, model_name):
        """The newest AVAILABLE version (failed versions are listed too, as END)."""
        available = [v for v, state in self.client.status() if state == "AVAILABLE"]
        if not available:
            raise UserError(f"{server} serves no available version of {model_name!r}; "
                            "see dplg-client --status.")
        return max(available)

    def _load(self, model, scales, threads):
        import tensorflow as tf

        from dplg_tf.config import PAPER_SCALES
        from dplg_tf.export.saved_models import resolve_saved_model

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(int(threads))
            tf.config.threading.set_inter_op_parallelism_threads(2)
        self.identity = resolve_saved_model(model)
        loaded = tf.saved_model.load(self.identity)
        self._loaded = loaded  # keeps the signatures' variables alive
        self._default = loaded.signatures["serving_default"]
        self._multiscale = loaded.signatures["multiscale"]
        # exports before dplg-extract existed have no batch path: serving_default then
        self.batched = hasattr(loaded, "describe_batch")
        own = loaded.scales.numpy().tolist() if hasattr(loaded, "scales") else None
        # the export's refinements (export.refinements; older exports have none)
        self.refinements = json.loads(loaded.refinements.numpy().decode()) if hasattr(
            loaded, "refinements") else None
        self.scales = [float(s) for s in (scales or own or PAPER_SCALES)]

    def describe_bytes(self, blobs):
        """Encoded images (list of bytes) -> descriptors [N, D]."""
        if self.client is not None:
            return self.client.describe_bytes(blobs)
        import tensorflow as tf

        return self._default(image_bytes=tf.constant(list(blobs), tf.string))[
            "global_descriptor"].numpy()

    def multiscale(self, image, scales):
        """uint8 image [H, W, 3] -> {global_descriptor, scale_descriptors, attention}."""
        if self.client is not None:
            return self.client.multiscale(image, scales)
        import tensorflow as tf

        out = self._multiscale(image=tf.constant(np.asarray(image, np.uint8)),
                               scales=tf.constant(list(scales), tf.float32))
        return {k: v.numpy() for k, v in out.items()}

    def describe_files(self, paths, batch_size=8, progress=None, concurrency=None):
        """(names, descriptors [n, D], [(name, reason)]): bad images are reported."""
        return describe_files(self.describe_bytes, paths, batch_size,
                              concurrency or self.concurrency, self.limits, progress)

    def describe_rows(self, blobs):
        """(descriptors [N, D] float32, zeros where refused; [None or (status,
        reason)]) of checked image bytes: the bulk path, see the module doc."""
        if self.client is not None or not self.batched:
            return self._rows_one_call_each(blobs)
        import tensorflow as tf

        errors, groups = [None] * len(blobs), {}
        for i, data in enumerate(blobs):
            try:
                image = self._loaded.decode_limited(tf.constant(data))
            except tf.errors.InvalidArgumentError as e:
                errors[i] = _refused(tf_error_message(e))
                continue
            groups.setdefault(tuple(image.shape), []).append((i, image))
        out = None
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                part = members[start:start + self.batch_size]
                rows = self._loaded.describe_batch(tf.stack([image for _, image in part]),
                                                   tf.constant(self.scales, tf.float32))
                rows = rows["global_descriptor"].numpy()
                out = np.zeros((len(blobs), rows.shape[1]), np.float32) if out is None else out
                self.calls, self.described = self.calls + 1, self.described + len(part)
                for (i, _), row in zip(part, rows):
                    out[i] = row
        return (out if out is not None else self._empty(len(blobs))), errors

    def _rows_one_call_each(self, blobs):
        """describe_rows through serving_default: batches of batch_size for a
        server (refused batches retried image by image), one image a call locally."""
        size = self.batch_size if self.client is not None else 1
        out, errors = self._empty(len(blobs)), [None] * len(blobs)

        def counted(batch):
            rows = self.describe_bytes(batch)
            self.calls, self.described = self.calls + 1, self.described + len(batch)
            return rows

        for start in range(0, len(blobs), size):
            rows = send_or_split(counted, blobs[start:start + size])
            for i, (row, reason) in enumerate(rows, start):
                if reason is None:
                    out[i] = row
                else:
                    errors[i] = _refused(reason)
        return out, errors

    def _empty(self, n):
        return np.zeros((n, self.probe().shape[0]), np.float32)

    def probe(self):
        """The model's descriptor of images.probe_image() (computed once)."""
        if self._probe is None:
            self._probe = np.asarray(self.describe_bytes([images.probe_bytes()])[0], np.float32)
        return self._probe

    def close(self):
        if self.client is not None:
            self.client.close()


def _refused(message):
    """(status, reason) of an image the model refused with `message`."""
    status = images.refusal_reason(message)
    return status, f"{status}: refused by the model: {message}"


def refusal(error):
    """Why the model refused an image, or None for errors of another kind
    (server gone, deadline): a server's INVALID_ARGUMENT details, or the
    sentence of a local SavedModel's InvalidArgumentError."""
    from dplg_tf.serving.client import ClientError

    if isinstance(error, ClientError):
        import grpc

        return error.details if error.code == grpc.StatusCode.INVALID_ARGUMENT else None
    if type(error).__name__ == "InvalidArgumentError":
        return tf_error_message(error)
    return None

def send_or_split(describe, blobs, refusal=refusal):
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
                   progress=None, refusal=refusal):
    """(names, descriptors [n, D], [(name, reason)]) of image files, through
    `describe(list of bytes) -> rows` (a Client's or a SavedModel's): each file
    is read and checked just before its batch is sent (at most `concurrency`
    batches of bytes in memory, whatever the number of files), a batch the
    model refuses is retried image by image, and every bad image is reported,
    never fatal. Other errors (server gone, deadline) are raised."""
    import concurrent.futures

    limits = limits or images.DEFAULT_LIMITS
    paths = list(paths)

    def send(batch):
        readable, results = [], {}
        for path in batch:
            try:
                readable.append((path, images.read_bytes(path, limits)))
            except images.ImageError as e:
                results[path] = (None, f"{e.reason}: {e}")
        rows = send_or_split(describe, [b for _, b in readable], refusal) if readable else []
        for (path, _), (row, error) in zip(readable, rows):
            results[path] = (row, None if error is None else f"refused by the model: {error}")
        if progress is not None:
            progress.update(len(batch))
        return [(path, *results[path]) for path in batch]

    names, descriptors, errors = [], [], []
    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        pending, batches = [], iter(range(0, len(paths), batch_size))
        for start in batches:   # a bounded window of batches in flight
            pending.append(pool.submit(send, paths[start:start + batch_size]))
            if len(pending) >= 2 * max(1, concurrency):
                _collect(pending.pop(0).result(), names, descriptors, errors)
        for future in pending:
            _collect(future.result(), names, descriptors, errors)
    dim = len(descriptors[0]) if descriptors else 0
    return names, np.asarray(descriptors, np.float32).reshape(len(names), dim), errors


def _collect(results, names, descriptors, errors):
    for path, row, error in results:
        if error is None:
            names.append(path)
            descriptors.append(np.asarray(row, np.float32))
        else:
            errors.append((images.display_name(path), error))

"""The gRPC client of dplg-serve and TensorFlow Serving (the same API).

Python:
    from dplg_tf.serving.client import Client
    client = Client("127.0.0.1:8500")
    descriptors = client.describe_files(["a.jpg", "b.png"])      # (2, 512)
    out = client.multiscale(image_uint8, scales=[0.5, 1.0])      # dict of arrays

CLI:
    dplg-client --server=127.0.0.1:8500 photos/ extra.jpg --output=desc.npz
    dplg-client --server=127.0.0.1:8500 --status

Requests carry a deadline; UNAVAILABLE and RESOURCE_EXHAUSTED are retried
with exponential backoff; batches of files go out concurrently.
"""

import concurrent.futures
import os
import sys
import time

import grpc
import numpy as np

from dplg_tf import cli

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class ClientError(Exception):
    """A request failed for good; `code` is the gRPC status code."""

    def __init__(self, code, message):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


def _make_tensor_proto(array):
    import tensorflow as tf

    return tf.make_tensor_proto(array)


def _make_ndarray(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


class Client:
    def __init__(self, server, model_name="dplg", timeout=60.0, retries=4, backoff=0.5,
                 max_message_mb=64, version=None):
        from tensorflow_serving.apis import (model_service_pb2_grpc,
                                             prediction_service_pb2_grpc)

        limit = max_message_mb * 1024 * 1024
        self.server = server
        self.channel = grpc.insecure_channel(server, options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit)])
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.model_name, self.version = model_name, version
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _spec(self, spec, signature=None):
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = int(self.version)
        if signature:
            spec.signature_name = signature

    def _call(self, method, request):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code()
                if code in RETRYABLE and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise ClientError(code, e.details()) from None
        raise AssertionError("unreachable")

    def predict(self, inputs, signature="serving_default", output_filter=()):
        """Raw Predict: {name: array} -> {name: array}."""
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(_make_tensor_proto(value))
        request.output_filter.extend(output_filter)
        response = self._call(self.predictions.Predict, request)
        return {k: _make_ndarray(v) for k, v in response.outputs.items()}

    def describe_bytes(self, images):
        """Encoded images (list of bytes) -> descriptors (N, D), one request."""
        if not images:
            return np.zeros((0, 0), np.float32)
        array = np.array(list(images), dtype=object)
        return self.predict({"image_bytes": array})["global_descriptor"]

    def describe_files(self, paths, batch_size=8, concurrency=4, progress=None):
        """Descriptors (N, D) of image files, batches sent concurrently."""
        def read(path):
            with open(path, "rb") as f:
                return f.read()

        chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        results = [None] * len(chunks)
        with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
            futures = {pool.submit(lambda c: self.describe_bytes([read(p) for p in c]), c): i
                       for i, c in enumerate(chunks)}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress.update(len(chunks[futures[future]]))
        return np.concatenate(results) if results else np.zeros((0, 0), np.float32)

    def multiscale(self, image, scales):
        """uint8 image (H, W, 3) -> global_descriptor, scale_descriptors, attention."""
        return self.predict({"image": np.asarray(image, np.uint8),
                             "scales": np.asarray(scales, np.float32)}, "multiscale")

    def status(self):
        """[(version, state name)] of the model."""
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self._call(self.models.GetModelStatus, request)
        return [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state))
                for s in response.model_version_status]

    def signatures(self):
        """{signature: ({input: (dtype, shape)}, {output: (dtype, shape)})}."""
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self._call(self.predictions.GetModelMetadata, request)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)

        def describe(tensors):
            return {name: (types_pb2.DataType.Name(t.dtype).replace("DT_", "").lower(),
                           [d.size for d in t.tensor_shape.dim]
                           if not t.tensor_shape.unknown_rank else None)
                    for name, t in tensors.items()}

        return {name: (describe(sig.inputs), describe(sig.outputs))
                for name, sig in sig_map.signature_def.items()
                if not name.startswith("__")}


def list_images(paths):
    """Image files named or found under folders (dplg_tf.images.list_images)."""
    from dplg_tf import images

    return images.list_images(paths)


def _refusal(error):
    """Why the model refused an image (INVALID_ARGUMENT from a server or a local
    SavedModel), or None for any other error."""
    if isinstance(error, ClientError):
        return error.details if error.code == grpc.StatusCode.INVALID_ARGUMENT else None
    if type(error).__name__ == "InvalidArgumentError":
        from dplg_tf.serving.versions import tf_error_message

        return tf_error_message(error)
    return None


def describe_checked(describe, paths, batch_size=8, concurrency=4, limits=None,
                     progress=None):
    """(names, descriptors [n, D], [(name, reason)]) of image files, through
    `describe(list of bytes) -> rows` (a Client's or a SavedModel's): each file
    is read and checked first, a batch the model refuses is retried image by
    image, and every bad image is reported, never fatal. Other errors (server
    gone, deadline) are raised."""
    from dplg_tf import images

    limits = limits or images.DEFAULT_LIMITS
    blobs, errors = [], []
    for path in paths:
        try:
            blobs.append((path, images.read_bytes(path, limits)))
        except images.ImageError as e:
            errors.append((images.display_name(path), f"{e.reason}: {e}"))
            if progress is not None:
                progress.update(1)

    def send(batch):
        try:
            rows = describe([b for _, b in batch])
            return [(p, r, None) for (p, _), r in zip(batch, rows)]
        except Exception as e:  # noqa: BLE001 - sorted by _refusal
            reason = _refusal(e)
            if reason is None:
                raise
            if len(batch) == 1:
                return [(batch[0][0], None, reason)]
            return [row for item in batch for row in send([item])]

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
            errors.append((images.display_name(path), f"refused by the model: {error}"))
    dim = len(descriptors[0]) if descriptors else 0
    return names, np.asarray(descriptors, np.float32).reshape(len(names), dim), errors


# -------------------------------------------------------------------- CLI

def _define_flags():
    from absl import flags

    from dplg_tf import images

    flags.DEFINE_string("server", "127.0.0.1:8500", "host:port of dplg-serve or TF Serving.")
    flags.DEFINE_string("model_name", "dplg", "Model name on the server.")
    flags.DEFINE_integer("model_version", None, "A specific version (default: the served one).")
    flags.DEFINE_string("output", "descriptors.npz", "The descriptor file to write (exactly "
                        "this name; unfinished work waits in <output>.parts/).")
    flags.DEFINE_integer("batch_size", 8, "Images per request.", lower_bound=1)
    flags.DEFINE_integer("chunk_size", 256, "Images per saved chunk (a rerun resumes at "
                         "the first unfinished chunk).", lower_bound=1)
    flags.DEFINE_integer("concurrency", 4, "Requests in flight.", lower_bound=1)
    flags.DEFINE_float("deadline", 120.0, "Seconds per request before it is abandoned.")
    flags.DEFINE_integer("retries", 4, "Retries on UNAVAILABLE / RESOURCE_EXHAUSTED.")
    flags.DEFINE_bool("status", False, "Print the model's status and signatures, then exit.")
    images.define_limit_flags(("max_pixels", "min_image_side", "max_request_mb"))


def main(argv):
    from absl import flags

    from dplg_tf import images
    from dplg_tf.descriptor_files import ChunkedOutput
    from dplg_tf.progress import Progress

    f = flags.FLAGS
    limits = images.limits_from_flags(("max_pixels", "min_image_side", "max_request_mb"))
    with Client(f.server, f.model_name, f.deadline, f.retries, version=f.model_version,
                max_message_mb=limits.max_request_mb) as c:
        if f.status:
            for version, state in c.status():
                print(f"{f.model_name} version {version}: {state}")
            for name, (inputs, outputs) in sorted(c.signatures().items()):
                print(f"signature {name}: inputs {inputs} -> outputs {outputs}")
            return
        problems = []
        files = images.list_images(argv[1:], problems)
        if not files and not problems:
            raise ValueError("Name image files or folders to describe (or use --status).")
        if os.path.isdir(f.output):
            raise ValueError(f"--output {f.output} is a folder; name a file.")
        try:
            probe = c.describe_bytes([images.probe_bytes()])[0]
            run = ChunkedOutput(f.output, files, f.chunk_size, probe)
            bar = Progress(len(files), "images")
            for i, names in run.chunks():
                if run.done(i):
                    bar.update(len(names))
                    continue
                ok, rows, errors = describe_checked(c.describe_bytes, names, f.batch_size,
                                                    f.concurrency, limits, bar)
                run.save(i, ok, rows, errors)
            bar.close()
        except ClientError as e:
            print(f"dplg-client: error: {e}; finished chunks are kept in {f.output}.parts "
                  "and a rerun resumes from them.", file=sys.stderr)
            sys.exit(1)
        count, dim, errors = run.finish()
    errors = problems + errors
    print(f"wrote {count} descriptors of dimension {dim} to {f.output}")
    if errors:
        for name, reason in errors[:20]:
            print(f"dplg-client: skipped {name}: {reason}", file=sys.stderr)
        print(f"dplg-client: {len(errors)} images were not described; their names and "
              f"reasons are in {f.output} (error_names, error_reasons).", file=sys.stderr)
        sys.exit(1)


def run():
    _define_flags()
    cli.run(main, "dplg-client")


if __name__ == "__main__":
    run()

"""The gRPC client of dplg-serve and TensorFlow Serving (the same API).

Python:
    from dplg_tf.serving.client import Client
    client = Client("127.0.0.1:8500")
    rows = client.describe_bytes([open("a.jpg", "rb").read()])   # (1, 512)
    out = client.multiscale(image_uint8, scales=[0.5, 1.0])      # dict of arrays

CLI:
    dplg-client --server=127.0.0.1:8500 photos/ extra.jpg --output=desc.npz
    dplg-client --server=127.0.0.1:8500 --status

Requests carry a deadline; UNAVAILABLE and RESOURCE_EXHAUSTED are retried
with exponential backoff; batches of files go out concurrently.
"""

import time

import grpc
import numpy as np


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


# -------------------------------------------------------------------- CLI

"""TensorFlow Serving's REST API over the same servicer as gRPC.

    GET  /v1/models/NAME[/versions/V | /labels/L]            model status
    GET  /v1/models/NAME[/versions/V | /labels/L]/metadata   signature_def
    POST /v1/models/NAME[/versions/V | /labels/L]:predict    predict

A predict body is `{"signature_name": ..., "instances": [...]}` (rows:
one value, or one {input: value} object, per row; answered
`{"predictions": [...]}`) or `{"inputs": value | {input: value}}`
(columns; answered `{"outputs": ...}`). Binary strings travel as
`{"b64": "..."}`. The JSON becomes the same PredictRequest a gRPC client
sends, through the same checks, limits, batcher and deadline, so a REST
answer holds the gRPC answer's numbers. Errors are `{"error": "..."}` with
the HTTP code TF Serving gives each status (http_server.cc): 400 bad
input, an unknown version label or signature, :classify / :regress, and
any other method or path under /v1/ ("Malformed request"); 404 an
unknown model or version; 429 resource exhausted (a full queue, too many
requests), 503 unavailable (nothing loaded yet), 504 deadline exceeded,
499 cancelled, 500 internal. Paths match without regard to case, as TF
Serving's patterns do. The Prometheus page is served at the monitoring
config's path.
"""

import logging
import re
import time

import grpc

from dplg_tf.http.bodies import parse_json
from dplg_tf.http.server import (DEFAULT_HTTP_LIMITS, Gate, HttpError, HttpServer,
                                  error_response, json_response, prometheus_response,
                                  read_body)
from dplg_tf.errors import shorten
from dplg_tf.serving.requests import ServingError
from dplg_tf.serving.rest_json import (REQUEST_KEYS, arrays_from_json, invalid, is_utf8,
                                       outputs_to_json)

log = logging.getLogger("dplg_tf.serving")

HTTP_CODES = {
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}

# TF Serving's path patterns (http_rest_api_util.cc), case-insensitive
API_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_SPEC = r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?"
PREDICT_PATH = re.compile(_SPEC + r":(classify|regress|predict)", re.IGNORECASE)
STATUS_PATH = re.compile(_SPEC + r"(/metadata)?", re.IGNORECASE)


def _model_spec(spec, name, version, label):
    from urllib.parse import unquote

    spec.name = unquote(name)
    if version is not None:   # the pattern allows digits only
        if int(version) >= (1 << 63):
            raise invalid(f"Version {shorten(version)} is out of range.")
        spec.version.value = int(version)
    if label is not None:
        spec.version_label = unquote(label)


def _message_json(message):
    from google.protobuf import json_format

    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=True)


# ------------------------------------------------------------------ the app

class RestApi:
    """The REST handlers over a PredictionServicer."""

    def __init__(self, servicer, limits, timeout_ms=30000, metrics=None, monitoring=None,
                 workers=32, max_concurrent=128, http_limits=None):
        self.servicer = servicer
        self.limit = limits.max_request_mb * 1024 * 1024
        self.timeout = timeout_ms / 1000.0 if timeout_ms and timeout_ms > 0 else None
        self.metrics = metrics
        self.monitoring = monitoring
        self.http_limits = http_limits or DEFAULT_HTTP_LIMITS
        self.gate = Gate(max_concurrent, workers, refusals=(HttpError, ServingError))

    def app(self):
        """The ASGI app: every path and method goes to `dispatch` (TF Serving
        matches /v1/ in any case and answers other methods there with a JSON
        error, which a router's 404 and 405 would not)."""
        from starlette.requests import Request

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            response = await self.dispatch(Request(scope, receive))
            await response(scope, receive, send)

        return app

    async def dispatch(self, request):
        raw = request.scope.get("raw_path")
        path = raw.decode("latin-1").split("?", 1)[0] if raw else request.url.path
        if API_PATH.fullmatch(path):
            return await self.v1(request, path)
        if (self.monitoring is not None and self.monitoring.enable
                and request.url.path == self.monitoring.path):
            if request.method != "GET":
                return error_response(400, f"Malformed request: {request.method} "
                                           f"{shorten(path)}")
            return await prometheus_response(self.metrics.registry)
        return error_response(404, f"Nothing is served at {shorten(path)}; the API is "
                                   "under /v1/models/.")

    async def v1(self, request, path):
        method = request.method
        match = PREDICT_PATH.fullmatch(path) if method == "POST" else None
        try:
            # the body first: a slow one holds no slot (the body timeout bounds it)
            body = None if match is None else await read_body(request, self.limit)
            self.gate.enter()
        except HttpError as e:
            return error_response(e.status, e)
        try:
            if match:
                return json_response(await self.gate.run(self._predict, match, body))
            status = STATUS_PATH.fullmatch(path) if method == "GET" else None
            if status:
                return json_response(await self.gate.run(self._status, status))
            raise invalid(f"Malformed request: {method} {shorten(path)}")
        except ServingError as e:
            return error_response(HTTP_CODES.get(e.code, 500), e)
        except HttpError as e:
            return error_response(e.status, e)
        except Exception as e:  # noqa: BLE001 - never take the server down
            log.exception("REST %s %s failed", method, path)
            return error_response(500, f"internal error: {e}")
        finally:
            self.gate.leave()

    def _status(self, match):
        from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2

        name, version, label, metadata = match.groups()
        if metadata:
            request = get_model_metadata_pb2.GetModelMetadataRequest()
            _model_spec(request.model_spec, name, version, label)
            request.metadata_field.append("signature_def")
            response = self.servicer.metadata(request, entrypoint="REST")
            signatures = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signatures)
            return {"model_spec": _message_json(response.model_spec),
                    "metadata": {"signature_def": _message_json(signatures)}}
        request = get_model_status_pb2.GetModelStatusRequest()
        _model_spec(request.model_spec, name, version, label)
        return _message_json(self.servicer.status(request, entrypoint="REST"))

    def _predict(self, match, body):
        start = time.monotonic()
        return self.servicer.measured("predict", match.group(1), "REST",
                                      lambda: self._predict_json(match, body, start))

    def _predict_json(self, match, body, start):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        name, version, label, verb = match.groups()
        request = predict_pb2.PredictRequest()
        _model_spec(request.model_spec, name, version, label)
        if verb.lower() != "predict":
            self.servicer.models.get(request.model_spec)   # an unknown model is still 404
            raise invalid(f":{verb.lower()} is not served: the model's signatures are "
                          "predict signatures, so use :predict.")
        try:
            doc = parse_json(body, self.http_limits)
        except HttpError as e:
            raise invalid(str(e)) from None
        if not isinstance(doc, dict):
            raise invalid("The request body must be a JSON object with 'instances' or "
                          "'inputs'.")
        unknown = sorted(set(doc) - REQUEST_KEYS)
        if unknown:
            raise invalid(f"Unknown fields {shorten(unknown)} in the request; it takes "
                          f"{sorted(REQUEST_KEYS)}.")
        if ("instances" in doc) == ("inputs" in doc):
            raise invalid("The request must hold exactly one of 'instances' (rows) or "
                          "'inputs' (columns).")
        signature = doc.get("signature_name", "serving_default")
        if not isinstance(signature, str) or not is_utf8(signature):
            raise invalid("'signature_name' must be a string (of UTF-8 text).")
        request.model_spec.signature_name = signature
        infos = self.servicer.input_infos(request.model_spec, signature)
        arrays, form = arrays_from_json(doc, infos)
        for key, array in arrays.items():
            dtype = tf.dtypes.as_dtype(infos[key].dtype)
            request.inputs[key].CopyFrom(tf.make_tensor_proto(array, dtype=dtype,
                                                              shape=array.shape))
        deadline = None if self.timeout is None else start + self.timeout
        _, _, outputs = self.servicer.predict_arrays(request, deadline=deadline)
        return outputs_to_json(outputs, form)


class RestServer(HttpServer):
    """The REST port of dplg-serve, behind `access` (http.access: hosts, CORS, token)."""

    def __init__(self, servicer, host, port, limits, timeout_ms=30000, metrics=None,
                 monitoring=None, workers=32, max_concurrent=128, access=None,
                 http_limits=None):
        from dplg_tf.http.access import protect

        self.api = RestApi(servicer, limits, timeout_ms, metrics, monitoring, workers,
                           max_concurrent, http_limits)
        super().__init__(protect(self.api.app(), access, host), host, port, name="rest",
                         limits=http_limits)

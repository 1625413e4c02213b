"""dplg-serve: a gRPC server that speaks TensorFlow Serving's API.

    dplg-serve --model_base_path=models/dplg --model_name=dplg --port=8500

- tensorflow.serving.PredictionService: Predict and GetModelMetadata (the
  other methods answer UNIMPLEMENTED); tensorflow.serving.ModelService:
  GetModelStatus; grpc.health.v1.Health.
- Serves the newest integer version under the base path, polls for newer
  ones and switches once the new one is loaded and warmed up; requests in
  flight finish on the version they started on.
- Batches concurrent serving_default requests (batching_parameters.txt, as
  TF Serving reads it); a full queue answers RESOURCE_EXHAUSTED.
- Bad input answers INVALID_ARGUMENT with the reason; an unknown model,
  version or signature NOT_FOUND. Binds 127.0.0.1 unless --host says
  otherwise. SIGTERM (or SIGINT) stops taking requests, lets those in flight
  finish, and exits.
"""

import logging
import threading
import time
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dplg_tf import images
from dplg_tf.serving import batching
from dplg_tf.serving.requests import ServingError, read_inputs, shorten
from dplg_tf.serving.model_manager import BATCHED_SIGNATURE, ModelManager, tf_error_message

log = logging.getLogger("dplg_tf.serving")

SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


def _apis():
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)
    return (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
            predict_pb2, prediction_service_pb2_grpc)


# --------------------------------------------------------------- requests

def _deadline(context):
    """(time.monotonic() deadline or None, is_active or None) of a gRPC call."""
    if context is None:
        return None, None
    remaining = context.time_remaining()
    return (None if remaining is None else time.monotonic() + remaining), context.is_active


class PredictionServicer:
    """tensorflow.serving.PredictionService and ModelService over a ModelManager.

    Each request is checked against `limits` before any work; one that
    waited past its deadline, or whose client left, is not started. Calls
    outside the batcher (multiscale) run at most `max_direct` at a time.
    """

    def __init__(self, manager, limits=images.DEFAULT_LIMITS, max_direct=2):
        self.manager = manager
        self.limits = limits
        self._direct = threading.BoundedSemaphore(max_direct)

    def _predict(self, request, context=None):
        import tensorflow as tf

        (_, _, _, predict_pb2, _) = _apis()
        model = self.manager.get(request.model_spec)
        name = request.model_spec.signature_name or "serving_default"
        if name not in model.signatures:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"signature {shorten(name)} not found; the model has "
                               f"{sorted(model.signatures)}")
        arrays = read_inputs(name, model.inputs[name], request.inputs, self.limits)
        outputs = model.signature_defs[name].outputs
        wanted = list(request.output_filter) or list(outputs)
        unknown = [o for o in wanted if o not in outputs]
        if unknown:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output_filter names unknown outputs {shorten(unknown)}; "
                               f"the signature has {sorted(outputs)}")
        deadline, is_active = _deadline(context)
        try:
            result = self._run(model, name, arrays, deadline, is_active)
        except batching.BatcherClosed:
            raise
        except batching.QueueFull as e:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except batching.Expired as e:
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except batching.Cancelled as e:
            raise ServingError(grpc.StatusCode.CANCELLED, str(e)) from None
        except tf.errors.InvalidArgumentError as e:   # the graph's checks refused the input
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, tf_error_message(e)) from None
        except tf.errors.ResourceExhaustedError as e:
            raise ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               tf_error_message(e)) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = name
        for key in wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(result[key]))
        return response

    def _run(self, model, name, arrays, deadline, is_active):
        """{output: array} of one checked request."""
        import tensorflow as tf

        if name == BATCHED_SIGNATURE:
            images_ = list(arrays["image_bytes"].ravel())
            dim = int(model.signature_defs[name].outputs["global_descriptor"]
                      .tensor_shape.dim[-1].size)
            if not images_:  # TF Serving answers an empty batch with [0, D]
                return {"global_descriptor": np.zeros((0, max(dim, 0)), np.float32)}
            if model.batcher is not None:
                rows = model.batcher(images_, deadline=deadline, is_active=is_active)
                return {"global_descriptor": np.asarray(rows).reshape(len(images_), -1)}
        with self._direct:
            if deadline is not None and time.monotonic() >= deadline:
                raise batching.Expired("the request's deadline passed while it waited")
            if is_active is not None and not is_active():
                raise batching.Cancelled("the client went away while the request waited")
            out = model.signatures[name](**{k: tf.constant(v) for k, v in arrays.items()})
        return {k: v.numpy() for k, v in out.items()}

    def Predict(self, request, context):
        try:
            for _ in range(3):
                try:
                    return self._predict(request, context)
                except batching.BatcherClosed:
                    continue  # the version was switched under us: take the new one
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "the model is being replaced")
        except ServingError as e:
            context.abort(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - never take the server down
            log.exception("Predict failed")
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")

    def GetModelMetadata(self, request, context):
        (get_model_metadata_pb2, _, _, _, _) = _apis()
        try:
            model = self.manager.get(request.model_spec)
            fields = list(request.metadata_field)
            if fields != ["signature_def"]:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "metadata_field must be exactly ['signature_def'], "
                                   f"got {fields}")
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for name, sig in model.signature_defs.items():
                sig_map.signature_def[name].CopyFrom(sig)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = model.name
            response.model_spec.version.value = model.version
            response.metadata["signature_def"].Pack(sig_map)
            return response
        except ServingError as e:
            context.abort(e.code, str(e))

    def GetModelStatus(self, request, context):
        """The served version AVAILABLE and each version that failed to load END
        with its error, as TF Serving reports them."""
        (_, get_model_status_pb2, _, _, _) = _apis()
        from tensorflow.core.protobuf import error_codes_pb2

        spec = request.model_spec
        if spec.name != self.manager.name:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"model {shorten(spec.name)} is not served here (this server "
                          f"serves {self.manager.name!r})")
        states = get_model_status_pb2.ModelVersionStatus
        rows = [(v, states.END, error_codes_pb2.UNKNOWN, message)
                for v, message in self.manager.failed_versions().items()]
        current = self.manager.current
        if current is not None:
            rows.append((current.version, states.AVAILABLE, error_codes_pb2.OK, ""))
        if spec.HasField("version"):
            rows = [r for r in rows if r[0] == spec.version.value]
        if not rows and not spec.HasField("version"):
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"model {self.manager.name!r} has no loaded version yet")
        if not rows:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"version {spec.version.value} of {self.manager.name!r} is neither "
                          "loaded nor failed")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state, code, message in sorted(rows):
            status = response.model_version_status.add()
            status.version, status.state = version, state
            status.status.error_code, status.status.error_message = code, message
        return response


# ----------------------------------------------------------------- server

class Server:
    """The gRPC server: services, health, version polling, graceful stop."""

    def __init__(self, model_base_path, model_name="dplg", host="127.0.0.1", port=8500,
                 batching_params=None, poll_seconds=1.0, limits=images.DEFAULT_LIMITS,
                 workers=32, warm_up=True, max_concurrent_rpcs=None):
        (_, _, model_service_pb2_grpc, _, prediction_service_pb2_grpc) = _apis()
        self.manager = ModelManager(model_name, model_base_path, batching_params,
                                    poll_seconds, warm_up)
        limit = limits.max_request_mb * 1024 * 1024
        # calls past max_concurrent_rpcs (in progress or waiting for a worker) are
        # answered RESOURCE_EXHAUSTED at once instead of queueing without bound
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            maximum_concurrent_rpcs=max_concurrent_rpcs or 4 * workers,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        threads = (batching_params or batching.DEFAULTS)["num_batch_threads"]
        prediction, models = _services(PredictionServicer(self.manager, limits, threads))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction,
                                                                            self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(models, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}; is the port in use?")
        self.address = f"{host}:{self.port}"
        self._set_health(False)

    def _set_health(self, serving):
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("",) + SERVICE_NAMES:
            self.health.set(service, status)

    def start(self):
        self.server.start()
        self.manager.start()

        def watch():  # health follows whether a version is loaded
            while self.manager.current is None and not self.manager._stop.is_set():
                time.sleep(0.1)
            if not self.manager._stop.is_set():
                self._set_health(True)

        threading.Thread(target=watch, daemon=True).start()
        return self

    def stop(self, grace=30.0):
        """Refuse new requests, finish those in flight (up to `grace` s), stop."""
        self._set_health(False)
        done = self.server.stop(grace)
        done.wait(grace + 1)
        self.manager.stop()

    def wait(self):
        self.server.wait_for_termination()


def _services(impl):
    """The generated servicer classes, forwarding to `impl`."""
    (_, _, model_service_pb2_grpc, _, prediction_service_pb2_grpc) = _apis()

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return impl.Predict(request, context)

        def GetModelMetadata(self, request, context):
            return impl.GetModelMetadata(request, context)

    class Models(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            return impl.GetModelStatus(request, context)

    return Prediction(), Models()


# -------------------------------------------------------------------- CLI

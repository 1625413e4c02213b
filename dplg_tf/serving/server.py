"""dplg-serve: a gRPC server that speaks TensorFlow Serving's API.

    dplg-serve --model_base_path=models/dplg --model_name=dplg --port=8500

- tensorflow.serving.PredictionService: Predict and GetModelMetadata (the
  other methods answer UNIMPLEMENTED); tensorflow.serving.ModelService:
  GetModelStatus and HandleReloadConfigRequest; grpc.health.v1.Health (the
  server's own, and one service name per model).
- Predict answers fill the typed fields (`float_val`, ...) as TF Serving
  does, or `tensor_content` with `tensor_content=True`
  (--enable_serialization_as_tensor_content).
- Serves the newest integer version under the base path, polls for newer
  ones and switches once the new one is loaded and warmed up; requests in
  flight finish on the version they started on.
- Batches concurrent serving_default requests (batching_parameters.txt, as
  TF Serving reads it); a full queue answers RESOURCE_EXHAUSTED.
- Bad input answers INVALID_ARGUMENT with the reason; an unknown model or
  version NOT_FOUND, an unknown version label INVALID_ARGUMENT and an
  unknown signature FAILED_PRECONDITION, as TF Serving answers them. Binds 127.0.0.1 unless --host says
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
from dplg_tf.errors import shorten
from dplg_tf.serving.requests import ServingError, read_inputs
from dplg_tf.serving.model_manager import BATCHED_SIGNATURE, ModelRegistry, tf_error_message

log = logging.getLogger("dplg_tf.serving")

SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

# numpy dtype -> the TensorProto field TF Serving fills for it (Tensor::AsProtoField)
TYPED_FIELDS = {
    "float32": "float_val", "float64": "double_val", "int8": "int_val", "int16": "int_val",
    "int32": "int_val", "uint8": "int_val", "uint16": "int_val", "int64": "int64_val",
    "uint32": "uint32_val", "uint64": "uint64_val", "bool": "bool_val",
    "float16": "half_val", "bfloat16": "half_val",
}


def output_proto(array, tensor_content=False):
    """The TensorProto of one output as TF Serving answers it: values in the
    typed field of their dtype (`float_val` for float32), or in
    `tensor_content` when asked; strings always in `string_val`."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=tf.dtypes.as_dtype(array.dtype).as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    field = TYPED_FIELDS.get(array.dtype.name)
    flat = np.ascontiguousarray(array).ravel()
    if tensor_content or field is None:
        proto.tensor_content = flat.tobytes()
    elif field == "half_val":   # the 16 bits of each value, as TensorFlow stores them
        proto.half_val.extend(flat.view(np.uint16).tolist())
    else:
        getattr(proto, field).extend(flat.tolist())
    return proto


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
    """tensorflow.serving.PredictionService and ModelService over a
    ModelRegistry, for gRPC and REST alike.

    Each request is checked against `limits` before any work; one that
    waited past its deadline, or whose client left, is not started. Calls
    outside the batcher (multiscale) run at most `max_direct` at a time.
    `predict`, `metadata` and `status` raise ServingError; the gRPC methods
    turn it into the call's status, the REST API into its HTTP code.
    """

    def __init__(self, models, limits=images.DEFAULT_LIMITS, max_direct=2, metrics=None,
                 tensor_content=False):
        self.models = models
        self.limits = limits
        self.metrics = metrics
        self.tensor_content = tensor_content
        self._direct = threading.BoundedSemaphore(max_direct)

    def input_infos(self, model_spec, signature_name):
        """{input name: TensorInfo} of a served signature (the REST API reads
        its dtypes), or ServingError."""
        model = self.models.get(model_spec)
        return dict(self._signature(model, signature_name).inputs)

    @staticmethod
    def _signature(model, name):
        if name not in model.signature_defs:
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"signature {shorten(name)} not found; the model has "
                               f"{sorted(model.signatures)}")
        if name not in model.signatures:   # listed, but not a function (the init op)
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"signature {shorten(name)} cannot be run; the model's "
                               f"signatures are {sorted(model.signatures)}")
        return model.signature_defs[name]

    def _predict(self, request, deadline, is_active):
        """(model, signature name, {output: array}) of one request."""
        import tensorflow as tf

        model = self.models.get(request.model_spec)
        name = request.model_spec.signature_name or "serving_default"
        outputs = self._signature(model, name).outputs
        arrays = read_inputs(name, model.inputs[name], request.inputs, self.limits)
        wanted = list(request.output_filter) or list(outputs)
        unknown = [o for o in wanted if o not in outputs]
        if unknown:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output_filter names unknown outputs {shorten(unknown)}; "
                               f"the signature has {sorted(outputs)}")
        start = time.perf_counter()
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
        if self.metrics is not None:
            self.metrics.runtime(model.name, time.perf_counter() - start)
        return model, name, {key: result[key] for key in wanted}

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

    def measured(self, api, model_name, entrypoint, fn):
        """fn() with the request counted and timed; ServingError passes through."""
        start, status = time.perf_counter(), "OK"
        try:
            return fn()
        except ServingError as e:
            status = e.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            if self.metrics is not None:
                self.metrics.request(model_name, status, time.perf_counter() - start, api,
                                     entrypoint)

    def predict_arrays(self, request, deadline=None, is_active=None):
        """(model, signature name, {output: array}) of a request, or
        ServingError (not counted)."""
        for _ in range(3):
            try:
                return self._predict(request, deadline, is_active)
            except batching.BatcherClosed:
                continue  # the version was unloaded under us: take the new one
        raise ServingError(grpc.StatusCode.UNAVAILABLE, "the model is being replaced")

    def predict_unmeasured(self, request, deadline=None, is_active=None):
        """The PredictResponse of a request, or ServingError (not counted)."""
        (_, _, _, predict_pb2, _) = _apis()
        model, name, outputs = self.predict_arrays(request, deadline, is_active)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = name
        for key, array in outputs.items():
            response.outputs[key].CopyFrom(output_proto(array, self.tensor_content))
        return response

    def predict(self, request, deadline=None, is_active=None, entrypoint="GRPC"):
        """The PredictResponse of a request, or ServingError; counted and timed."""
        return self.measured("predict", request.model_spec.name, entrypoint,
                             lambda: self.predict_unmeasured(request, deadline, is_active))

    def metadata(self, request, entrypoint="GRPC"):
        """The GetModelMetadataResponse (signature_def) of a request."""
        (get_model_metadata_pb2, _, _, _, _) = _apis()

        def answer():
            model = self.models.get(request.model_spec)
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
        return self.measured("metadata", request.model_spec.name, entrypoint, answer)

    def status(self, request, entrypoint="GRPC"):
        """The GetModelStatusResponse: each version's state and error as TF
        Serving reports them (ModelManager.status_rows)."""
        (_, get_model_status_pb2, _, _, _) = _apis()
        from tensorflow.core.protobuf import error_codes_pb2

        def answer():
            spec = request.model_spec
            manager = self.models.manager(spec.name)
            if spec.HasField("version") and spec.version_label:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "give a version or a version label, not both")
            rows = manager.status_rows()
            version = None
            if spec.version_label:
                version = manager.label_version(spec.version_label)
            elif spec.HasField("version"):
                version = spec.version.value
            if version is not None:
                rows = [r for r in rows if r[0] == version]
                if not rows:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"version {version} of {spec.name!r} is not loaded, "
                                       "loading, failed or asked for")
            elif not rows:
                raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                   f"model {spec.name!r} has no loaded version yet")
            states = get_model_status_pb2.ModelVersionStatus.State
            response = get_model_status_pb2.GetModelStatusResponse()
            for version, state, code, message in rows:
                status = response.model_version_status.add()
                status.version, status.state = version, states.Value(state)
                status.status.error_code = getattr(error_codes_pb2, code)
                status.status.error_message = message
            return response
        return self.measured("status", request.model_spec.name, entrypoint, answer)

    def _grpc(self, method, request, context, **kwargs):
        try:
            return method(request, **kwargs)
        except ServingError as e:
            context.abort(e.code, str(e))
        except Exception as e:  # noqa: BLE001 - never take the server down
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e}")

    def Predict(self, request, context):
        deadline, is_active = _deadline(context)
        return self._grpc(self.predict, request, context, deadline=deadline,
                          is_active=is_active)

    def GetModelMetadata(self, request, context):
        return self._grpc(self.metadata, request, context)

    def GetModelStatus(self, request, context):
        return self._grpc(self.status, request, context)


# ----------------------------------------------------------------- server

class Server:
    """The gRPC server (and the REST port, when asked): services, health,
    version polling, model config polling, graceful stop.

    Serves one model (`model_base_path`, `model_name`) or the models of a
    ModelServerConfig (`model_config_file`, reread every
    `config_poll_seconds` when that is > 0); ModelService's
    HandleReloadConfigRequest changes them the same way (`reload`).
    `rest_port` None leaves REST off (0: any free port); `monitoring`
    (serving.config.MonitoringConfig) puts the Prometheus page on the REST
    port. `tensor_content` answers Predict's outputs in tensor_content
    instead of the typed fields; `allow_unavailable_labels` lets a version
    label point at a version that is not loaded (TF Serving's
    --allow_version_labels_for_unavailable_models). `access`
    (http.access.Access: allowed hosts, CORS origins, token) guards the REST
    port; None: loopback host names only, no CORS, no token. `http_limits`
    (http.server.HttpLimits): the REST port's timeouts and bounds.
    """

    def __init__(self, model_base_path=None, model_name="dplg", host="127.0.0.1", port=8500,
                 batching_params=None, poll_seconds=1.0, limits=images.DEFAULT_LIMITS,
                 workers=32, warm_up=True, max_concurrent_rpcs=None, model_config_file=None,
                 config_poll_seconds=0.0, rest_port=None, monitoring=None,
                 rest_timeout_ms=30000, rest_workers=None, tensor_content=False,
                 allow_unavailable_labels=False, access=None, http_limits=None):
        from dplg_tf.serving import config as config_lib
        from dplg_tf.serving.metrics import Metrics

        (_, _, model_service_pb2_grpc, _, prediction_service_pb2_grpc) = _apis()
        if bool(model_base_path) == bool(model_config_file):
            raise ValueError("give exactly one of model_base_path or model_config_file")
        self.model_config_file = model_config_file
        self.config_poll_seconds = config_poll_seconds
        self.allow_unavailable_labels = allow_unavailable_labels
        self._config_file = (config_lib.ModelConfigFile(model_config_file)
                             if model_config_file else None)
        configs = (self._config_file.configs if model_config_file
                   else [config_lib.ModelConfig(model_name, model_base_path)])
        self._file_configs = configs   # what the config file said when last applied
        self._config_problem = None
        self._reload_lock = threading.Lock()
        self.metrics = Metrics()
        self.models = ModelRegistry(configs, batching_params, poll_seconds, warm_up,
                                    self.metrics)
        self.metrics.known_models = lambda: self.models.names   # other names: one label
        limit = limits.max_request_mb * 1024 * 1024
        concurrent = max_concurrent_rpcs or 4 * workers
        # calls past max_concurrent_rpcs (in progress or waiting for a worker) are
        # answered RESOURCE_EXHAUSTED at once instead of queueing without bound
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers),
            maximum_concurrent_rpcs=concurrent,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        threads = (batching_params or batching.DEFAULTS)["num_batch_threads"]
        self.servicer = PredictionServicer(self.models, limits, threads, self.metrics,
                                           tensor_content)
        prediction, models = _services(self.servicer, self.reload_request)
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
        self.rest = None
        if rest_port is not None:
            from dplg_tf.serving.rest import RestServer

            self.rest = RestServer(self.servicer, host, rest_port, limits,
                                   timeout_ms=rest_timeout_ms, metrics=self.metrics,
                                   monitoring=monitoring, workers=rest_workers or workers,
                                   max_concurrent=concurrent, access=access,
                                   http_limits=http_limits)
        self.rest_address = None if self.rest is None else self.rest.address
        self._stop = threading.Event()
        self._health = {}
        self._health_lock = threading.Lock()
        self._set_health(False)

    @property
    def manager(self):
        """The ModelManager of the first model (the only one without a config file)."""
        return self.models.managers()[0]

    def _set_health(self, serving, models=None, unless_stopped=False):
        """The server's health (SERVING while at least one model serves) and
        each model's, under its name; a model no longer served is unknown."""
        codes = health_pb2.HealthCheckResponse
        wanted = {service: codes.SERVING if serving else codes.NOT_SERVING
                  for service in ("",) + SERVICE_NAMES}
        for name, up in (models or {}).items():
            wanted.setdefault(name, codes.SERVING if up else codes.NOT_SERVING)
        with self._health_lock:
            if unless_stopped and self._stop.is_set():
                return
            for name in self._health:
                wanted.setdefault(name, codes.SERVICE_UNKNOWN)
            for service, status in wanted.items():
                if self._health.get(service) != status:
                    self.health.set(service, status)
            self._health = wanted

    def start(self):
        """Start serving; UserError (after stopping) when a version label of the
        config points at a version that did not load."""
        from dplg_tf.errors import UserError

        self.server.start()
        if self.rest is not None:
            self.rest.start()
        self.models.start()   # loads what is on disk before returning
        problem = self.models.label_problem(self.models.configs(),
                                            self.allow_unavailable_labels)
        if problem is not None:
            self.stop(0)
            raise UserError(problem)

        def watch():  # health follows which models have a loaded version
            while not self._stop.is_set():
                models = {m.name: m.current is not None for m in self.models.managers()}
                self._set_health(any(models.values()), models, unless_stopped=True)
                self._stop.wait(0.2)

        threading.Thread(target=watch, name="health", daemon=True).start()
        if self.model_config_file and self.config_poll_seconds > 0:
            threading.Thread(target=self._poll_config, name="config-poll",
                             daemon=True).start()
        return self

    def reload(self, configs):
        """Serve `configs` from now on (a reread config file, or a
        ReloadConfigRequest): models are added, removed and re-policied. A
        version label that may not point where it does (label_problem) is
        FAILED_PRECONDITION, and the served set is kept."""
        with self._reload_lock:
            problem = self.models.label_problem(configs, self.allow_unavailable_labels)
            if problem is not None:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, problem)
            if configs != self.models.configs():
                log.info("model config changed: serving %s", [c.name for c in configs])
                self.models.update(configs)

    def reload_request(self, request):
        """The ReloadConfigResponse of a HandleReloadConfigRequest, or ServingError."""
        from tensorflow_serving.apis import model_management_pb2, status_pb2

        from dplg_tf.errors import UserError
        from dplg_tf.serving.config import model_configs_from_proto

        try:
            configs = model_configs_from_proto(request.config, "The ReloadConfigRequest's "
                                               "config")
        except UserError as e:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            self.reload(configs)
        except ServingError as e:
            log.error("HandleReloadConfigRequest refused (the served models stay): %s", e)
            raise
        response = model_management_pb2.ReloadConfigResponse()
        response.status.CopyFrom(status_pb2.StatusProto())
        return response

    def _poll_config(self):
        while not self._stop.wait(self.config_poll_seconds):
            try:
                self.poll_config_once()
            except Exception:  # noqa: BLE001 - a bug must not end the polls
                log.exception("rereading the model config failed; tried again later")

    def poll_config_once(self):
        """Reread the model config file; a change that has settled (serving.
        config.ModelConfigFile) is served through `reload`, a bad file is
        logged (once) and the served config kept, to be tried again. True if
        the served config changed."""
        from dplg_tf.errors import UserError

        try:
            configs = self._config_file.poll()
            changed = configs is not None and configs != self._file_configs
            if changed:
                self.reload(configs)
                self._file_configs = configs
        except (UserError, ServingError) as e:
            if str(e) != self._config_problem:
                log.error("the model config was not reread (the old one stays): %s", e)
            self._config_problem = str(e)
            return False
        self._config_problem = None
        return changed

    def stop(self, grace=30.0):
        """Refuse new requests, finish those in flight (up to `grace` s), stop."""
        self._stop.set()
        self._set_health(False, {m.name: False for m in self.models.managers()})
        if self.rest is not None:
            self.rest.stop(grace)
        done = self.server.stop(grace)
        done.wait(grace + 1)
        self.models.stop()

    def wait(self):
        self.server.wait_for_termination()


def _services(impl, reload_request):
    """The generated servicer classes, forwarding to `impl` (and ModelService's
    reload to `reload_request`)."""
    (_, _, model_service_pb2_grpc, _, prediction_service_pb2_grpc) = _apis()

    class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return impl.Predict(request, context)

        def GetModelMetadata(self, request, context):
            return impl.GetModelMetadata(request, context)

    class Models(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            return impl.GetModelStatus(request, context)

        def HandleReloadConfigRequest(self, request, context):
            return impl._grpc(reload_request, request, context)

    return Prediction(), Models()


# -------------------------------------------------------------------- CLI

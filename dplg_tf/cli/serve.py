"""dplg-serve: the model server (TF Serving's gRPC and REST APIs) on a model
base path or a model config file (dplg_tf.serving.server, serving.rest).

    dplg-serve --model_base_path=models/dplg --port=8500 --rest_api_port=8501
    dplg-serve --model_config_file=serving/models.config \
        --monitoring_config_file=serving/monitoring.config
"""

import logging
import os
import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.cli.flags import (access_from_flags, define_access_flags, define_http_flags,
                              http_limits_from_flags, define_limit_flags,
                              limits_from_flags)
from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.serving import batching
from dplg_tf.serving.config import read_monitoring_config
from dplg_tf.serving.server import Server

log = logging.getLogger("dplg_tf.serving")


def _define_flags():
    flags.DEFINE_string("model_base_path", None, "Folder of integer version folders (or "
                        "--model_config_file).")
    flags.DEFINE_string("model_name", "dplg", "Name clients ask for (with --model_base_path).")
    flags.DEFINE_string("model_config_file", None, "ModelServerConfig text file: several "
                        "models, version policies, labels (serving/models.config).")
    flags.DEFINE_float("model_config_file_poll_wait_seconds", 0.0, "How often to reread "
                       "--model_config_file (0: read once).", lower_bound=0)
    flags.DEFINE_string("monitoring_config_file", None, "MonitoringConfig text file: "
                        "Prometheus metrics on the REST port (serving/monitoring.config).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 for all).")
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port, printed).",
                         lower_bound=0, upper_bound=65535)
    flags.DEFINE_integer("rest_api_port", 8501, "REST port (0: no REST API).",
                         lower_bound=0, upper_bound=65535)
    flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "Deadline of a REST request "
                         "(0: none).", lower_bound=0)
    flags.DEFINE_integer("rest_api_num_threads", 0, "Threads serving REST requests (0: "
                         "--grpc_workers).", lower_bound=0)
    flags.DEFINE_bool("enable_batching", True, "Batch concurrent serving_default requests.")
    flags.DEFINE_string("batching_parameters_file", None,
                        "TF Serving batching_parameters.txt (default: built-in values).")
    flags.DEFINE_float("file_system_poll_wait_seconds", 1.0, "How often to look for versions.")
    flags.DEFINE_bool("enable_serialization_as_tensor_content", False, "Answer Predict's "
                      "outputs in tensor_content instead of the typed fields (float_val, ...).")
    flags.DEFINE_bool("enable_model_warmup", True, "Replay each version's "
                      "assets.extra/tf_serving_warmup_requests (dplg-export writes it) before "
                      "serving it; a file that fails fails the load.")
    flags.DEFINE_bool("allow_version_labels_for_unavailable_models", False, "Let a new version "
                      "label point at a version that is not loaded yet.")
    define_limit_flags()
    flags.DEFINE_integer("grpc_workers", 32, "Threads serving gRPC calls.", lower_bound=1)
    flags.DEFINE_integer("maximum_concurrent_rpcs", 0, "Calls in progress or waiting at most; "
                         "more are answered RESOURCE_EXHAUSTED (0: 4 x --grpc_workers).",
                         lower_bound=0)
    flags.DEFINE_float("grace_seconds", 30.0, "On SIGTERM, time for requests in flight.")
    define_access_flags("the REST API and its metrics page (not the gRPC port)")
    define_http_flags()   # header/body/keep-alive timeouts, connections, JSON bounds


def main(argv):
    del argv
    f = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    params = None
    if f.enable_batching:
        params = dict(batching.DEFAULTS)
        if f.batching_parameters_file:
            with open(f.batching_parameters_file) as fh:
                params = batching.parse_batching_parameters(fh.read())
    if bool(f.model_base_path) == bool(f.model_config_file):
        raise UserError("Give exactly one of --model_base_path (one model) or "
                        "--model_config_file (several).")
    if f.model_base_path and not os.path.isdir(f.model_base_path):
        raise InputNotFound(f"--model_base_path {f.model_base_path!r} is not a folder; "
                            "export a model there with dplg-export.")
    monitoring = None
    if f.monitoring_config_file:
        monitoring = read_monitoring_config(f.monitoring_config_file)
        if monitoring.enable and not f.rest_api_port:
            raise UserError("--monitoring_config_file serves metrics on the REST port; "
                            "give --rest_api_port.")
    server = Server(f.model_base_path, f.model_name, f.host, f.port, params,
                    f.file_system_poll_wait_seconds, limits_from_flags(),
                    f.grpc_workers, max_concurrent_rpcs=f.maximum_concurrent_rpcs,
                    model_config_file=f.model_config_file,
                    config_poll_seconds=f.model_config_file_poll_wait_seconds,
                    rest_port=f.rest_api_port or None, monitoring=monitoring,
                    rest_timeout_ms=f.rest_api_timeout_in_ms,
                    rest_workers=f.rest_api_num_threads or None,
                    tensor_content=f.enable_serialization_as_tensor_content,
                    warm_up=f.enable_model_warmup,
                    allow_unavailable_labels=f.allow_version_labels_for_unavailable_models,
                    access=access_from_flags(), http_limits=http_limits_from_flags()
                    ).start()
    models = ", ".join(repr(n) for n in server.models.names)
    where = f.model_base_path or f.model_config_file
    print(f"dplg-serve: listening on {server.address} (gRPC) for {models} from {where}",
          flush=True)
    if server.rest_address:
        print(f"dplg-serve: REST API on http://{server.rest_address}/v1/models/...",
              flush=True)
        if monitoring is not None and monitoring.enable:
            print(f"dplg-serve: metrics on http://{server.rest_address}{monitoring.path}",
                  flush=True)
    cli.wait_for_stop_signal(log)
    server.stop(f.grace_seconds)
    print("dplg-serve: stopped", flush=True)


def run():
    _define_flags()
    cli.run(main, "dplg-serve")


if __name__ == "__main__":
    sys.exit(run())

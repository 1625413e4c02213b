"""dplg-serve: the model server (TF Serving API over gRPC) on a model base path
(dplg_tf.serving.server).

    dplg-serve --model_base_path=models/dplg --port=8500
"""

import logging
import os
import signal
import sys
import threading

from absl import flags

from dplg_tf import cli
from dplg_tf.cli.flags import define_limit_flags, limits_from_flags
from dplg_tf.errors import InputNotFound
from dplg_tf.serving import batching
from dplg_tf.serving.server import Server

log = logging.getLogger("dplg_tf.serving")


def _define_flags():
    flags.DEFINE_string("model_base_path", None, "Folder of integer version folders.",
                        required=True)
    flags.DEFINE_string("model_name", "dplg", "Name clients ask for.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 for all).")
    flags.DEFINE_integer("port", 8500, "gRPC port (0: any free port, printed).")
    flags.DEFINE_bool("enable_batching", True, "Batch concurrent serving_default requests.")
    flags.DEFINE_string("batching_parameters_file", None,
                        "TF Serving batching_parameters.txt (default: built-in values).")
    flags.DEFINE_float("file_system_poll_wait_seconds", 1.0, "How often to look for versions.")
    define_limit_flags()
    flags.DEFINE_integer("grpc_workers", 32, "Threads serving gRPC calls.", lower_bound=1)
    flags.DEFINE_integer("maximum_concurrent_rpcs", 0, "Calls in progress or waiting at most; "
                         "more are answered RESOURCE_EXHAUSTED (0: 4 x --grpc_workers).",
                         lower_bound=0)
    flags.DEFINE_float("grace_seconds", 30.0, "On SIGTERM, time for requests in flight.")


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
    if not os.path.isdir(f.model_base_path):
        raise InputNotFound(f"--model_base_path {f.model_base_path!r} is not a folder; "
                                "export a model there with dplg-export.")
    server = Server(f.model_base_path, f.model_name, f.host, f.port, params,
                    f.file_system_poll_wait_seconds, limits_from_flags(),
                    f.grpc_workers, max_concurrent_rpcs=f.maximum_concurrent_rpcs).start()
    print(f"dplg-serve: listening on {server.address} for model {f.model_name!r} "
          f"from {f.model_base_path}", flush=True)
    stopping = threading.Event()

    def on_signal(signum, frame):
        del frame
        log.info("signal %d: draining requests in flight and stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):
        pass
    server.stop(f.grace_seconds)
    print("dplg-serve: stopped", flush=True)


def run():
    _define_flags()
    cli.run(main, "dplg-serve")


if __name__ == "__main__":
    sys.exit(run())

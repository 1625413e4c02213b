#!/usr/bin/env python3
"""Change the models a running server serves: ModelService.HandleReloadConfigRequest.

    python serving/reload_models.py --server=127.0.0.1:8500 serving/models.config

Sends a model_config_list in TF Serving's text format (the file
--model_config_file takes) to `tensorflow_model_server` or `dplg-serve`;
models are added, removed and re-policied without a restart. Prints the
server's answer and exits 1 when it refused the config (the served set is
then unchanged). Needs only grpcio and tensorflow-serving-api.
"""

import argparse
import sys

import grpc
from google.protobuf import text_format
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="A models.config file (model_config_list { ... }).")
    parser.add_argument("--server", default="127.0.0.1:8500", help="host:port (gRPC).")
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds to wait.")
    args = parser.parse_args()
    with open(args.config) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    request = model_management_pb2.ReloadConfigRequest(config=config)
    with grpc.insecure_channel(args.server) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        try:
            answer = stub.HandleReloadConfigRequest(request, timeout=args.timeout)
        except grpc.RpcError as e:
            sys.exit(f"{args.server}: {e.code().name}: {e.details()}")
    if answer.status.error_code:
        sys.exit(f"{args.server} refused the config: {answer.status.error_message}")
    print(f"{args.server} now serves the models of {args.config}")


if __name__ == "__main__":
    main()

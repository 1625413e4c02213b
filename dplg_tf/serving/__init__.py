"""Serving: the model server that speaks TF Serving's API (server: gRPC
Predict / GetModelMetadata / GetModelStatus and health; rest: the REST API
over the same servicer, rest_json: its JSON bodies as arrays and back;
batching: the shared batcher; requests: checking a request before any work;
model_manager: the version folders it loads and switches and the models of
a config; config: TF Serving's model and monitoring config files; metrics:
Prometheus metrics under TF Serving's names), and the gRPC client of it and
of TF Serving (client). The client knows nothing of describers (retrieval).

Imports: every layer up to http.
"""

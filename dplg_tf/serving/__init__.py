"""Serving: the model server that speaks TF Serving's API (server: gRPC
Predict / GetModelMetadata / GetModelStatus and health; batching: the shared
batcher; requests: checking a request before any work; model_manager: the
version folders it loads and switches), and the gRPC client of it and of
TF Serving (client). The client knows nothing of describers (retrieval).

Imports: every layer up to export.
"""

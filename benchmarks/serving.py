"""Serving over HTTP: dplg-serve's REST API against its gRPC API, and the
search server end to end against describe + search in-process.

One run, on this machine, in alternated rounds (the machine's speed drifts):
1. REST vs gRPC: `clients` threads each send `requests` batch-1 predict
   requests (one JPEG, serving_default) over keep-alive connections, first
   over gRPC then over REST, per round; throughput and p50 / p99 latency per
   protocol; the ratio REST / gRPC throughput is the median of the rounds'.
2. Search: `queries` query images, one at a time, through the search server
   (POST /v1/search, JSON with b64, top 10) and in-process (the same
   SavedModel's describe_bytes + DescriptorIndex.search over the same index
   folder); the ratio is in-process time / server time (throughput ratio).
The model is the CPU demo's (small backbone), where the model call is
cheapest and so the HTTP and JSON overhead weighs most; `--backbone resnet50`
gives the paper's model.
Usage: python benchmarks/serving.py [--rounds 3] [--clients 8] [--backbone small]
"""

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import record  # noqa: E402


def _jpeg(seed, h, w):
    from PIL import Image

    from dplg_tf.images import facade_image

    buf = io.BytesIO()
    Image.fromarray(facade_image(h, w, seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _percentiles(latencies):
    a = np.asarray(latencies) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _clients(n, per_client, make_call):
    """(requests/s, [latency s], errors) of n threads each calling make_call()() per_client times."""
    latencies, errors, lock = [], [0], threading.Lock()

    def run():
        call = make_call()
        mine = []
        for _ in range(per_client):
            start = time.perf_counter()
            try:
                call()
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    if not errors[0]:
                        print(f"first error: {type(e).__name__}: {e}", flush=True)
                    errors[0] += 1
                continue
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.perf_counter() - start), latencies, errors[0]


def rest_vs_grpc(args, base, blob):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from dplg_tf.serving import batching
    from dplg_tf.serving.server import Server

    server = Server(base, "dplg", "127.0.0.1", 0, dict(batching.DEFAULTS), rest_port=0).start()
    while not server.models.ready():
        time.sleep(0.1)
    host, port = server.rest_address.rsplit(":", 1)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dplg"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([blob], dtype=tf.string))
    body = json.dumps({"instances": [{"b64": base64.b64encode(blob).decode()}]})

    def grpc_call():
        channel = grpc.insecure_channel(server.address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def call():
            out = stub.Predict(request, timeout=120)
            assert tf.make_ndarray(out.outputs["global_descriptor"]).shape[0] == 1
        return call

    def rest_call():
        conn = http.client.HTTPConnection(host, int(port), timeout=120)

        def call():
            conn.request("POST", "/v1/models/dplg:predict", body,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            assert response.status == 200, payload[:200]
            assert len(json.loads(payload)["predictions"][0]) > 0
        return call

    try:
        _clients(args.clients, 2, grpc_call)   # warm-up
        _clients(args.clients, 2, rest_call)
        rows = {"gRPC": [], "REST": []}
        ratios = []
        for i in range(args.rounds):
            g = _clients(args.clients, args.requests, grpc_call)
            r = _clients(args.clients, args.requests, rest_call)
            rows["gRPC"].append(g)
            rows["REST"].append(r)
            ratios.append(r[0] / g[0])
            print(f"round {i + 1}: gRPC {g[0]:.1f} req/s, REST {r[0]:.1f} req/s, "
                  f"REST/gRPC {ratios[-1]:.3f}, errors {g[2]}/{r[2]}", flush=True)
    finally:
        server.stop(5)
    summary = {}
    for name, results in rows.items():
        latencies = [x for _, lat, _ in results for x in lat]
        summary[name] = (statistics.median(r[0] for r in results), *_percentiles(latencies),
                         sum(r[2] for r in results))
    return summary, statistics.median(ratios)


def search_vs_in_process(args, base, work):
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.index import DescriptorIndex
    from dplg_tf.search.service import Searcher, SearchServer

    describer = Describer(model=base)
    queries = [_jpeg(1000 + i, 480, 640) for i in range(args.queries)]
    real = describer.describe_bytes(queries)
    rng = np.random.default_rng(0)
    others = rng.normal(size=(args.database, real.shape[1])).astype(np.float32)
    index = DescriptorIndex(real.shape[1], "exact", describer.probe())
    index.add(np.concatenate([real, others]),
              [f"q{i}.jpg" for i in range(len(real))] + [f"d{i}" for i in range(len(others))])
    folder = os.path.join(work, "idx")
    index.save(folder)
    server = SearchServer(Searcher(folder, describer, reload_seconds=0), "127.0.0.1", 0).start()
    host, port = server.address.rsplit(":", 1)
    loaded = DescriptorIndex.load(folder)
    bodies = [json.dumps({"image": {"b64": base64.b64encode(q).decode()}, "top_k": 10})
              for q in queries]

    def in_process(i):
        vector = describer.describe_bytes([queries[i]])
        _, ids = loaded.search(vector, 10)
        assert loaded.names[ids[0][0]] == f"q{i}.jpg"

    conn = http.client.HTTPConnection(host, int(port), timeout=120)

    def through_server(i):
        conn.request("POST", "/v1/search", bodies[i], {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200 and answer["results"][0]["name"] == f"q{i}.jpg"

    def timed(fn):
        latencies = []
        for i in range(len(queries)):
            start = time.perf_counter()
            fn(i)
            latencies.append(time.perf_counter() - start)
        return latencies

    try:
        timed(in_process)   # warm-up
        timed(through_server)
        local, remote, ratios = [], [], []
        for i in range(args.rounds):
            a, b = timed(in_process), timed(through_server)
            local += a
            remote += b
            ratios.append(sum(a) / sum(b))
            print(f"round {i + 1}: in-process {sum(a) / len(a) * 1000:.1f} ms/query, server "
                  f"{sum(b) / len(b) * 1000:.1f} ms/query, ratio {ratios[-1]:.3f}", flush=True)
    finally:
        conn.close()
        server.stop(5)
    return _percentiles(local), _percentiles(remote), statistics.median(ratios), len(index)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client and round")
    parser.add_argument("--queries", type=int, default=30, help="search queries per round")
    parser.add_argument("--database", type=int, default=20000, help="index vectors besides "
                        "the queries'")
    parser.add_argument("--backbone", default="small")
    args = parser.parse_args()

    import keras

    from dplg_tf.config import base_config
    from dplg_tf.export import export as export_lib
    from dplg_tf.nn.model import build_dplg

    keras.utils.set_random_seed(0)
    config = base_config()
    config.model.backbone = args.backbone
    if args.backbone == "small":
        config.model.local_dim = 32
    work = tempfile.mkdtemp(prefix="dplg_serving_bench_")
    try:
        base = os.path.join(work, "dplg")
        export_lib.export(build_dplg(config), base)
        blob = _jpeg(7, 480, 640)
        protocols, rest_ratio = rest_vs_grpc(args, base, blob)
        local, remote, search_ratio, size = search_vs_in_process(args, base, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| what | req/s (median of rounds) | p50 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|"]
    for name, (rate, p50, p99, errors) in protocols.items():
        lines.append(f"| {name} predict, batch 1, {args.clients} clients | {rate:.1f} | "
                     f"{p50:.1f} | {p99:.1f} | {errors} |")
    body = "\n".join(lines) + f"""

REST / gRPC throughput: **{rest_ratio:.3f}x** (median of {args.rounds} rounds' ratios; goal >= 0.9x).

| search, one query at a time, top 10 of {size} (exact) | p50 ms | p99 ms |
|---|---:|---:|
| describe + search in-process | {local[0]:.1f} | {local[1]:.1f} |
| dplg-search-server (POST /v1/search, JSON b64) | {remote[0]:.1f} | {remote[1]:.1f} |

Search server / in-process throughput: **{search_ratio:.3f}x** (median of rounds; goal >= 0.9x).

Command: `python benchmarks/serving.py --rounds {args.rounds} --clients {args.clients} \
--requests {args.requests} --queries {args.queries} --backbone {args.backbone}`.
{args.backbone} backbone, random weights, 640x480 JPEGs through serving_default
(the paper's 5 scales); the server in the benchmark's process (client threads
share its interpreter), keep-alive connections for both protocols. The HTTP
servers' listening socket is made with proto TCP so that asyncio sets
TCP_NODELAY on each connection: without it a response's head and body waited
for a delayed ACK (about 40 ms a request) and the search server ran at 0.79x."""
    print(body)
    record(f"Serving over HTTP: REST vs gRPC, search server ({args.backbone} backbone)", body)


if __name__ == "__main__":
    main()

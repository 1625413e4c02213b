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
import struct
import sys
import tempfile
import threading
import time
import zlib

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
    from dplg_tf.search.searcher import Searcher
    from dplg_tf.search.service import SearchServer

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


def _config(name):
    """configs/NAME.py's config."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _serving_rate(fn, batches, rounds):
    """[images/s of each round] of fn(batch) over `batches`."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        rates.append(sum(map(len, batches)) / (time.perf_counter() - start))
    return rates


def precision(args):
    """bfloat16 exports against float32 ones (speed, cosine, mAP), and dplg-serve
    against the same SavedModel in-process; returns the Markdown body."""
    import grpc
    import keras
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from dplg_tf.data import synthetic
    from dplg_tf.data.revisited import load_dataset
    from dplg_tf.export import export as export_lib
    from dplg_tf.nn.model import build_dplg
    from dplg_tf.retrieval.eval_run import run_eval
    from dplg_tf.serving import batching
    from dplg_tf.serving.server import Server

    work = tempfile.mkdtemp(prefix="dplg_precision_bench_")
    rows, server_rows = [], []
    try:
        data = os.path.join(work, "data")
        synthetic.generate(data, num_landmarks=1, views_per_landmark=1, progress=False)
        dataset = load_dataset(data, "synthetic")
        paths = [dataset.image_path(i) for i in range(len(dataset.imlist))]
        blobs = [open(p, "rb").read() for p in paths[:args.batch * 3]]
        batches = [blobs[i:i + args.batch] for i in range(0, len(blobs), args.batch)]
        models = {"EfficientNet-Lite0, ImageNet weights (configs/pretrained_lite0.py)":
                  _config("pretrained_lite0"),
                  "ResNet50 DPLG (configs/dplg_r50_gldv2.py), random weights":
                  _config("dplg_r50_gldv2")}
        models[list(models)[1]].model.backbone_weights = None
        for title, config in models.items():
            keras.utils.set_random_seed(0)
            model = build_dplg(config)
            exports, runs = {}, {}
            for precision_name in ("float32", "bfloat16"):
                base = os.path.join(work, f"m{len(rows)}_{precision_name}")
                exports[precision_name] = export_lib.export(
                    model, base, max_image_side=config.eval.max_image_side,
                    precision=precision_name)
                results, _, _, db, queries = run_eval(
                    "synthetic", data, model=exports[precision_name], progress=False,
                    output_dir=os.path.join(work, f"eval_{len(rows)}_{precision_name}"))
                runs[precision_name] = (results, np.concatenate([db, queries]))
            loaded = {k: tf.saved_model.load(v).signatures["serving_default"]
                      for k, v in exports.items()}
            calls = {k: (lambda f: lambda b: f(image_bytes=tf.constant(b)))(f)
                     for k, f in loaded.items()}
            for f in calls.values():   # warm-up
                f(batches[0])
            rates = {k: [] for k in calls}
            for _ in range(args.rounds):   # alternated: the machine's speed drifts
                for k, f in calls.items():
                    rates[k] += _serving_rate(f, batches, 1)
            a, b = runs["float32"][1], runs["bfloat16"][1]
            cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) *
                                               np.linalg.norm(b, axis=1))
            ratio = statistics.median(x / y for x, y in zip(rates["bfloat16"],
                                                            rates["float32"]))
            rows.append((title, {k: statistics.median(v) for k, v in rates.items()}, ratio,
                         float(cosine.min()), float(cosine.mean()),
                         {k: (r[0]["medium"]["mAP"], r[0]["hard"]["mAP"])
                          for k, r in runs.items()}, len(a)))
            print(rows[-1], flush=True)
            # dplg-serve against the same SavedModel in-process, same batches
            for precision_name in ("float32", "bfloat16"):
                base = os.path.dirname(exports[precision_name])
                server = Server(base, "dplg", "127.0.0.1", 0, dict(batching.DEFAULTS)).start()
                try:
                    while not server.models.ready():
                        time.sleep(0.1)
                    channel = grpc.insecure_channel(server.address)
                    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

                    def served(batch):
                        request = predict_pb2.PredictRequest()
                        request.model_spec.name = "dplg"
                        request.inputs["image_bytes"].CopyFrom(
                            tf.make_tensor_proto(batch, dtype=tf.string))
                        out = stub.Predict(request, timeout=300)
                        assert len(out.outputs["global_descriptor"].float_val) > 0

                    served(batches[0])
                    local, remote = [], []
                    for _ in range(args.rounds):
                        local += _serving_rate(calls[precision_name], batches, 1)
                        remote += _serving_rate(served, batches, 1)
                    channel.close()
                finally:
                    server.stop(5)
                server_rows.append((title, precision_name, statistics.median(local),
                                    statistics.median(remote),
                                    statistics.median(r / l for r, l in zip(remote, local))))
                print(server_rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| model | float32 images/s | bfloat16 images/s | bf16 / f32 | cosine min / "
             "mean | mAP M / H float32 | mAP M / H bfloat16 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for title, rate, ratio, cmin, cmean, maps, n in rows:
        lines.append(f"| {title} | {rate['float32']:.2f} | {rate['bfloat16']:.2f} | "
                     f"**{ratio:.2f}x** | {cmin:.5f} / {cmean:.5f} | "
                     f"{maps['float32'][0]:.2f} / {maps['float32'][1]:.2f} | "
                     f"{maps['bfloat16'][0]:.2f} / {maps['bfloat16'][1]:.2f} |")
    lines += ["", "| model | precision | in-process images/s | dplg-serve (gRPC) images/s | "
              "served / in-process |", "|---|---|---:|---:|---:|"]
    for title, precision_name, local, remote, ratio in server_rows:
        lines.append(f"| {title} | {precision_name} | {local:.2f} | {remote:.2f} | "
                     f"**{ratio:.2f}x** |")
    return "\n".join(lines) + f"""

Command: `python benchmarks/serving.py --precision --rounds {args.rounds} --batch \
{args.batch}`. `dplg-export --precision=bfloat16` (export/precision.py: Keras'
mixed_bfloat16 policy, weights float32 and frozen into the graph, the input
and the final normalisation float32) against the float32 export of the same
model, both through serving_default in-process on batches of {args.batch} of the
synthetic set's 256x192 JPEGs at the paper's 5 scales ({3 * args.batch} images a
round, rounds alternated, medians of {args.rounds}; ratio the median of the
rounds' ratios). Cosine: each of the synthetic set's {rows[0][6]} images (database and
queries) described by both exports. mAP: the synthetic set's Revisited-style
Medium / Hard (goal: within 0.3). dplg-serve: one gRPC client sending the
same batches to the server (in this process, default batching) against
serving_default called in-process (goal >= 0.9x)."""


def png_bomb(side):
    """A small PNG of side x side flat pixels, compressed row by row."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))

    row = b"\x00" + bytes([90, 120, 30]) * side
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2,
                                                              0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _vm_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def hostile(args):
    """dplg-serve (its own process) under hostile clients: good clients'
    requests/s on the REST status call with and without `--slow` slow clients
    beside them (each declares a 1 MB predict body and sends a byte every 5 s,
    reconnecting when closed), and the server's RSS before and after 100
    refused ~60 MB bodies ({"instances": [{}, {}, ...]})."""
    import socket
    import subprocess

    import keras

    from dplg_tf.config import base_config
    from dplg_tf.export import export as export_lib
    from dplg_tf.nn.model import build_dplg

    keras.utils.set_random_seed(0)
    config = base_config()
    config.model.backbone, config.model.local_dim = "small", 32
    work = tempfile.mkdtemp(prefix="dplg_hostile_bench_")
    base = os.path.join(work, "dplg")
    export_lib.export(build_dplg(config), base)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    rest_port = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen(
        [sys.executable, "-m", "dplg_tf.cli.serve", f"--model_base_path={base}", "--port=0",
         f"--rest_api_port={rest_port}"], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    address = f"127.0.0.1:{rest_port}"
    stop, slow_socks, lock = threading.Event(), [], threading.Lock()

    def slow_one():
        s = socket.create_connection(("127.0.0.1", rest_port))
        s.sendall(f"POST /v1/models/dplg:predict HTTP/1.1\r\nHost: {address}\r\n"
                  "Content-Length: 1000000\r\n\r\n{".encode())
        return s

    def trickle():   # a byte every 5 s on each; a closed one is opened again
        while not stop.wait(5.0):
            with lock:
                for i, s in enumerate(slow_socks):
                    try:
                        s.send(b" ")
                    except OSError:
                        s.close()
                        slow_socks[i] = slow_one()

    def good_rate(seconds):
        done, errors = [0], [0]
        end = time.perf_counter() + seconds

        def run():
            conn = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=30)
            while time.perf_counter() < end:
                try:
                    conn.request("GET", "/v1/models/dplg")
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == 200
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn, ok = http.client.HTTPConnection("127.0.0.1", rest_port,
                                                          timeout=30), False
                done[0] += ok
                errors[0] += not ok
            conn.close()
        threads = [threading.Thread(target=run) for _ in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return done[0] / (time.perf_counter() - start), errors[0]

    try:
        line = ""
        while "REST API" not in line:
            line = server.stdout.readline()
            if not line:
                raise RuntimeError("dplg-serve did not start")
        threading.Thread(target=trickle, daemon=True).start()
        good_rate(2)   # warm-up
        rows = []
        for i in range(args.rounds):
            alone = good_rate(args.seconds)
            with lock:
                slow_socks.extend(slow_one() for _ in range(args.slow))
            time.sleep(1)
            beside = good_rate(args.seconds)
            with lock:
                for s in slow_socks:
                    s.close()
                slow_socks.clear()
            rows.append((alone, beside))
            print(f"round {i + 1}: alone {alone[0]:.1f} req/s ({alone[1]} errors), beside "
                  f"{args.slow} slow clients {beside[0]:.1f} req/s ({beside[1]} errors)",
                  flush=True)
            time.sleep(1)
        body = b'{"instances": [' + b"{}," * 20_000_000 + b"{}]}"
        before = _vm_rss_mb(server.pid)
        codes = {}
        for _ in range(100):
            conn = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=120)
            conn.request("POST", "/v1/models/dplg:predict", body,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            conn.close()
            codes[response.status] = codes.get(response.status, 0) + 1
        time.sleep(1)
        after = _vm_rss_mb(server.pid)
        print(f"RSS {before:.0f} MB -> {after:.0f} MB after 100 refused bodies {codes}",
              flush=True)

        def predict(blob):
            conn = http.client.HTTPConnection("127.0.0.1", rest_port, timeout=300)
            conn.request("POST", "/v1/models/dplg:predict", json.dumps(
                {"instances": [{"b64": base64.b64encode(blob).decode()}]}),
                {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.status

        legit = _jpeg(0, 1024, 1024)
        warm = [predict(legit) for _ in range(3)]   # the cost of a large image, paid once
        bomb = png_bomb(6300)
        bomb_before = _vm_rss_mb(server.pid)
        bomb_codes = [predict(bomb) for _ in range(5)]
        time.sleep(1)
        bomb_after = _vm_rss_mb(server.pid)
        print(f"RSS {bomb_before:.0f} MB -> {bomb_after:.0f} MB after 5 PNG bombs of "
              f"{len(bomb) / 1e3:.0f} KB ({bomb_codes}; warmed by {warm})", flush=True)
    finally:
        stop.set()
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    ratios = [b[0] / a[0] for a, b in rows]
    alone = statistics.median(a[0] for a, _ in rows)
    beside = statistics.median(b[0] for _, b in rows)
    errors = sum(a[1] + b[1] for a, b in rows)
    return f"""| dplg-serve REST, GET /v1/models/dplg, {args.clients} good clients | req/s (median of {args.rounds} rounds) |
|---|---:|
| alone | {alone:.1f} |
| beside {args.slow} slow clients (1 MB declared, a byte every 5 s) | {beside:.1f} |

With / without slow clients: **{statistics.median(ratios):.3f}x** (median of the rounds'
ratios; goal >= 0.8x); good requests that failed: {errors}.

Server RSS (VmRSS of the dplg-serve process) before and after 100 refused
{len(body) / 1e6:.0f} MB bodies (`{{"instances": [{{}}, {{}}, ...]}}`, answered {codes}):
{before:.0f} MB -> {after:.0f} MB, **{after - before:+.0f} MB** (goal: within 300 MB).

PNG bombs: 5 predicts of a {len(bomb) / 1e3:.0f} KB PNG of 6300 x 6300 pixels (within
the 40 M pixel limit; answered {bomb_codes}), after 3 of a 1024 x 1024 JPEG: RSS
{bomb_before:.0f} MB -> {bomb_after:.0f} MB, **{bomb_after - bomb_before:+.0f} MB**.

Command: `python benchmarks/serving.py --hostile --rounds {args.rounds} --clients \
{args.clients} --slow {args.slow} --seconds {args.seconds}`. dplg-serve in its own
process with its default HTTP bounds (10 s header, 60 s body, 5 s keep-alive
timeouts, 512 connections); clients in the benchmark's process; {args.seconds} s
windows, alternated."""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="per client and round")
    parser.add_argument("--queries", type=int, default=30, help="search queries per round")
    parser.add_argument("--database", type=int, default=20000, help="index vectors besides "
                        "the queries'")
    parser.add_argument("--backbone", default="small")
    parser.add_argument("--precision", action="store_true", help="only the precision part: "
                        "bfloat16 vs float32 exports, dplg-serve vs in-process")
    parser.add_argument("--batch", type=int, default=8, help="--precision: images a request")
    parser.add_argument("--hostile", action="store_true", help="only the hostile-clients "
                        "part: slow clients beside good ones, RSS after refused bodies")
    parser.add_argument("--slow", type=int, default=130, help="--hostile: slow clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="--hostile: window")
    args = parser.parse_args()
    if args.hostile:
        body = hostile(args)
        print(body)
        record("Serving under hostile clients: slow clients, refused bodies", body)
        return
    if args.precision:
        body = precision(args)
        print(body)
        record("Serving precision: bfloat16 exports, dplg-serve vs in-process", body)
        return

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

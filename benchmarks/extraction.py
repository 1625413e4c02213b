"""Multi-scale descriptor extraction: SavedModel in-process vs our gRPC server.

One run, on this machine:
1. the TF fp32 matmul peak (GFLOP/s of large square matmuls);
2. the paper's 5-scale extraction of a 1024x768 JPEG through the exported
   SavedModel (ResNet50 + DPLG, random weights: the cost does not depend on
   them): s/image and achieved GFLOP/s (2 x multiply-adds of backbone + head
   at every scale, counted by dplg_tf.costs), and its share of the peak;
3. the same request through dplg-serve at batch 1 (p50 latency, ratio to the
   in-process p50) and from 8 concurrent clients (throughput, ratio to the
   in-process throughput, errors).
Usage: python benchmarks/extraction.py [--requests N] [--head dplg]
"""

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import record  # noqa: E402


def matmul_peak(n=2048, repeats=10):
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    best = 0.0
    for _ in range(3):
        tf.matmul(a, b).numpy()
        start = time.perf_counter()
        for _ in range(repeats):
            c = tf.matmul(a, b)
        c.numpy()
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def multiscale_gflop(model, height, width, scales, max_side=1024, min_side=64):
    from dplg_tf.costs import count_macs

    s = min(1.0, max_side / max(height, width))
    h0, w0 = round(height * s), round(width * s)
    macs = 0
    for scale in scales:
        macs += count_macs(model, max(min_side, round(h0 * scale)),
                           max(min_side, round(w0 * scale)))
    return 2 * macs / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per_client", type=int, default=2, help="requests per concurrent client")
    parser.add_argument("--head", default="dplg")
    args = parser.parse_args()

    import tensorflow as tf
    from PIL import Image

    from dplg_tf import export as export_lib
    from dplg_tf.config import PAPER_SCALES, base_config
    from dplg_tf.data.synthetic import facade_image
    from dplg_tf.model import build_dplg
    from dplg_tf.serving import batching
    from dplg_tf.serving.client import Client
    from dplg_tf.serving.server import Server

    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s", flush=True)

    config = base_config()
    config.model.head = args.head
    model = build_dplg(config)
    gflop = multiscale_gflop(model, 768, 1024, PAPER_SCALES)
    work = tempfile.mkdtemp(prefix="dplg_extract_")
    try:
        path = export_lib.export(model, os.path.join(work, "dplg"))
        del model
        buf = io.BytesIO()
        Image.fromarray(facade_image(768, 1024)).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        serve = tf.saved_model.load(path).signatures["serving_default"]
        request = tf.constant([data])

        def local_call():
            serve(image_bytes=request)["global_descriptor"].numpy()

        local_call()  # warm-up
        params = dict(batching.DEFAULTS)
        server = Server(os.path.join(work, "dplg"), "dplg", "127.0.0.1", 0, params).start()
        try:
            client = Client(server.address, timeout=600, retries=8)
            client.status()
            client.describe_bytes([data])  # warm-up

            def remote_call():
                client.describe_bytes([data])

            # batch 1, in-process and gRPC alternated so that drift hits both alike
            local, remote = [], []
            for _ in range(args.requests):
                for fn, times in ((local_call, local), (remote_call, remote)):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
            local_p50, remote_p50 = statistics.median(local), statistics.median(remote)
            print(f"batch 1: in-process p50 {local_p50:.3f} s ({gflop / local_p50:.1f} "
                  f"GFLOP/s, {gflop:.1f} GFLOP/image), gRPC p50 {remote_p50:.3f} s", flush=True)

            def concurrent(fn_factory):
                """Images/s and errors of `clients` threads x `requests` calls."""
                errors, count = [], []

                def worker():
                    fn = fn_factory()
                    for _ in range(args.per_client):
                        try:
                            fn()
                            count.append(1)
                        except Exception as e:  # noqa: BLE001
                            errors.append(repr(e))

                threads = [threading.Thread(target=worker) for _ in range(args.clients)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return len(count) / (time.perf_counter() - start), errors

            def grpc_factory():
                c = Client(server.address, timeout=600, retries=8)
                return lambda: c.describe_bytes([data])

            local_rate, local_errors = concurrent(lambda: local_call)
            concurrent_rate, errors = concurrent(grpc_factory)
            print(f"{args.clients} concurrent callers: in-process {local_rate:.3f} images/s, "
                  f"gRPC {concurrent_rate:.3f} images/s, {len(errors)} errors", flush=True)
        finally:
            server.stop(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    share = gflop / local_p50 / peak
    table = f"""
| what | figure | goal |
|---|---:|---|
| TF fp32 matmul peak (2048^2) | {peak:.1f} GFLOP/s | |
| ResNet50+{args.head}, 5 scales, 1024x768 JPEG, SavedModel in-process | {local_p50:.3f} s/image, {gflop / local_p50:.1f} GFLOP/s ({gflop:.1f} GFLOP/image) | |
| share of the matmul peak | {share:.2f} | >= 0.75 |
| gRPC batch 1, p50 latency | {remote_p50:.3f} s ({remote_p50 / local_p50:.3f}x in-process) | <= 1.05x |
| {args.clients} concurrent callers x {args.per_client} requests, in-process | {local_rate:.3f} images/s, {len(local_errors)} errors | |
| {args.clients} concurrent gRPC clients x {args.per_client} requests | {concurrent_rate:.3f} images/s ({concurrent_rate / local_rate:.3f}x in-process), {len(errors)} errors | >= 0.95x, 0 errors |
"""
    print(table)
    record(f"Extraction and serving, {args.head} head (benchmarks/extraction.py)", table + f"""
Command: `python benchmarks/extraction.py --requests {args.requests} --per_client {args.per_client} --head {args.head}`.
Random weights (the cost does not depend on them); GFLOP = 2 x multiply-adds of
convolutions and matrix products at the five scaled sizes. Batch-1 calls
alternate in-process and gRPC; throughput compares the same number of
concurrent callers in-process (threads on the loaded SavedModel) and over gRPC
(the server batches them).
""")


if __name__ == "__main__":
    main()

"""Multi-scale descriptor extraction: SavedModel in-process vs our gRPC server.

One run, on this machine:
1. the TF fp32 matmul peak (GFLOP/s of large square matmuls);
2. the paper's 5-scale extraction of a 1024x768 JPEG through the exported
   SavedModel (ResNet50 + DPLG, random weights: the cost does not depend on
   them): s/image and achieved GFLOP/s (2 x multiply-adds of backbone + head
   at every scale, counted by dplg_tf.nn.costs), and its share of the peak; also
   the same model exported with --nofreeze (weights as variables);
3. the same request through dplg-serve at batch 1 (p50 latency, ratio to the
   in-process p50) and from 8 concurrent clients (throughput, ratio to the
   in-process throughput, errors).
This machine is shared and its speed drifts by tens of percent within
minutes, so every figure is taken in rounds that alternate what is compared:
each batch-1 round measures the peak, the in-process calls and the gRPC call,
then the peak again, and the share of the peak is the median over rounds of
each round's own ratio.
Usage: python benchmarks/extraction.py [--rounds N] [--head dplg]
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
    """GFLOP/s of `repeats` fp32 n x n matmuls (one measurement)."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.matmul(a, b).numpy()
    start = time.perf_counter()
    for _ in range(repeats):
        c = tf.matmul(a, b)
    c.numpy()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def multiscale_gflop(model, height, width, scales, max_side=1024, min_side=64):
    from dplg_tf.nn.costs import count_macs

    s = min(1.0, max_side / max(height, width))
    h0, w0 = round(height * s), round(width * s)
    macs = 0
    for scale in scales:
        macs += count_macs(model, max(min_side, round(h0 * scale)),
                           max(min_side, round(w0 * scale)))
    return 2 * macs / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="alternated batch-1 rounds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrent_rounds", type=int, default=3,
                        help="alternated rounds of `clients` concurrent requests")
    parser.add_argument("--head", default="dplg")
    args = parser.parse_args()

    import tensorflow as tf
    from PIL import Image

    from dplg_tf.export import export as export_lib
    from dplg_tf.config import PAPER_SCALES, base_config
    from dplg_tf.images.probe import facade_image
    from dplg_tf.nn.model import build_dplg
    from dplg_tf.serving import batching
    from dplg_tf.serving.client import Client
    from dplg_tf.serving.server import Server

    config = base_config()
    config.model.head = args.head
    model = build_dplg(config)
    gflop = multiscale_gflop(model, 768, 1024, PAPER_SCALES)
    work = tempfile.mkdtemp(prefix="dplg_extract_")
    try:
        path = export_lib.export(model, os.path.join(work, "dplg"))
        plain_path = export_lib.export(model, os.path.join(work, "plain"), freeze=False)
        del model
        buf = io.BytesIO()
        Image.fromarray(facade_image(768, 1024)).save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        request = tf.constant([data])
        serve = tf.saved_model.load(path).signatures["serving_default"]
        plain = tf.saved_model.load(plain_path).signatures["serving_default"]

        def local_call():
            serve(image_bytes=request)["global_descriptor"].numpy()

        def plain_call():
            plain(image_bytes=request)["global_descriptor"].numpy()

        local_call()  # warm-up
        plain_call()
        server = Server(os.path.join(work, "dplg"), "dplg", "127.0.0.1", 0,
                        dict(batching.DEFAULTS)).start()
        try:
            client = Client(server.address, timeout=600, retries=8)
            client.status()
            client.describe_bytes([data])  # warm-up

            def remote_call():
                client.describe_bytes([data])

            def timed(fn):
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start

            local, frozen_vs_plain, remote, shares, peaks = [], [], [], [], []
            for i in range(args.rounds):
                before = matmul_peak()
                t_local, t_plain, t_remote = timed(local_call), timed(plain_call), \
                    timed(remote_call)
                after = matmul_peak()
                local.append(t_local)
                remote.append(t_remote / t_local)
                frozen_vs_plain.append(t_plain / t_local)
                peaks += [before, after]
                shares.append(gflop / t_local / ((before + after) / 2))
                print(f"round {i + 1}: peak {before:.0f}/{after:.0f} GFLOP/s, in-process "
                      f"{t_local:.3f} s ({gflop / t_local:.0f} GFLOP/s, share "
                      f"{shares[-1]:.2f}), --nofreeze {t_plain:.3f} s, gRPC {t_remote:.3f} s",
                      flush=True)
            local_p50 = statistics.median(local)
            share = statistics.median(shares)
            remote_ratio = statistics.median(remote)
            freeze_gain = statistics.median(frozen_vs_plain)

            def concurrent(fn_factory):
                """Seconds for `clients` threads making one call each, and errors."""
                errors = []

                def worker(fn):
                    try:
                        fn()
                    except Exception as e:  # noqa: BLE001
                        errors.append(repr(e))

                threads = [threading.Thread(target=worker, args=(fn_factory(),))
                           for _ in range(args.clients)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return time.perf_counter() - start, errors

            def grpc_factory():
                c = Client(server.address, timeout=600, retries=8)
                return lambda: c.describe_bytes([data])

            local_s = remote_s = 0.0
            errors = []
            for i in range(args.concurrent_rounds):
                s_local, e_local = concurrent(lambda: local_call)
                s_remote, e_remote = concurrent(grpc_factory)
                local_s, remote_s = local_s + s_local, remote_s + s_remote
                errors += e_local + e_remote
                print(f"concurrent round {i + 1}: {args.clients} in-process callers "
                      f"{s_local:.1f} s, {args.clients} gRPC clients {s_remote:.1f} s",
                      flush=True)
            n = args.clients * args.concurrent_rounds
            local_rate, concurrent_rate = n / local_s, n / remote_s
        finally:
            server.stop(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = f"""
| what | figure | goal |
|---|---:|---|
| TF fp32 matmul peak (2048^2), {len(peaks)} measurements | median {statistics.median(peaks):.1f}, range {min(peaks):.1f}-{max(peaks):.1f} GFLOP/s | |
| ResNet50+{args.head}, 5 scales, 1024x768 JPEG, SavedModel in-process | p50 {local_p50:.3f} s/image, {gflop / local_p50:.1f} GFLOP/s ({gflop:.1f} GFLOP/image) | |
| share of the matmul peak (median of {args.rounds} rounds' ratios) | {share:.2f} | >= 0.75 |
| the same exported with --nofreeze (weights as variables) | {freeze_gain:.2f}x the time of the default export | |
| gRPC batch 1, latency | {remote_ratio:.3f}x in-process (median of rounds) | <= 1.05x |
| {args.clients} concurrent callers, in-process | {local_rate:.3f} images/s | |
| {args.clients} concurrent gRPC clients | {concurrent_rate:.3f} images/s ({concurrent_rate / local_rate:.3f}x in-process), {len(errors)} errors | >= 0.95x, 0 errors |
"""
    print(table)
    record(f"Extraction and serving, {args.head} head (benchmarks/extraction.py)", table + f"""
Command: `python benchmarks/extraction.py --rounds {args.rounds} --concurrent_rounds {args.concurrent_rounds} --head {args.head}`.
Random weights (the cost does not depend on them); GFLOP = 2 x multiply-adds of
convolutions and matrix products at the five scaled sizes. The default export
holds the weights as graph constants. Batch-1 rounds each measure the matmul
peak, an in-process call, a --nofreeze call, a gRPC call and the peak again; the
share is the median of the rounds' (GFLOP/s) / (mean of the round's two peaks).
Throughput: rounds alternate {args.clients} concurrent in-process callers
(threads on the loaded SavedModel) and {args.clients} concurrent gRPC clients
(the server batches them); {n} requests each way in all.
""")


if __name__ == "__main__":
    main()

"""At the scale of the paper's Table 1: figures the tests cannot give.

    python benchmarks/scale.py --work /tmp/scale --parts arcface,eval
    python benchmarks/scale.py --work /tmp/scale --parts eval --sizes 10000,100000,1000000

Parts (each recorded in RESULTS.md as its own section):
- arcface: the ArcFace head at GLDv2-clean's 81,313 classes: parameters, the
  bytes all-reduced per step (every trainable variable's float32 gradient:
  the proxies' gradient is dense), a training step's time and peak RSS on
  this CPU (small backbone, so the head dominates), and ResNet50's numbers.
- serve: the server with 4x more concurrent clients than gRPC workers, mixed
  small and large requests, for --seconds: latency per kind, refusals, calls
  past their deadline, hung clients.
- streaming: peak RSS of dplg-index on image folders and dplg-whiten on
  records at two sizes (flat when they stream).
- eval: peak RSS (VmHWM, /usr/bin/time -v) and wall time of `dplg-eval` on the
  synthetic set with N generated distractors (descriptor-like: clustered unit
  vectors, carrying the model's probe), plain, +QE (k=2), +DBA (k=2; exact
  up to 200k, the approximate IVF graph above, whose recall is printed).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def timed(cmd):
    """(seconds, peak RSS in MB, stdout, stderr) of `cmd` under /usr/bin/time -v."""
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True,
                          env=ENV)
    seconds = time.time() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr[-3000:]}")
    return seconds, int(match.group(1)) / 1024 if match else None, proc.stdout, proc.stderr


ARCFACE_SCRIPT = r"""
import json, time
import numpy as np
import tensorflow as tf
from dplg_tf.config import base_config
from dplg_tf.nn.model import build_training_model
from dplg_tf.training.optim import build_train_step, make_optimizer

def peak_mb():
    with open("/proc/self/status") as f:
        return [int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM")][0]

out = {}
for backbone in ("resnet50", "small"):
    c = base_config()
    c.model.backbone, c.model.backbone_weights = backbone, None
    if backbone == "small":
        c.model.local_dim = 256
    c.train.warmup_steps = 0
    model = build_training_model(c, 81313)
    arcface = sum(int(np.prod(v.shape)) for v in model.get_layer("arcface").trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    row = {"trainable_parameters": total, "arcface_parameters": arcface,
           "allreduce_mb_per_step": round(total * 4 / 2 ** 20, 1)}
    if backbone == "small":
        opt = make_optimizer(c, model, 100)
        opt.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
        train_step = build_train_step(tf.distribute.get_strategy(), model, opt, c.train, 32, step)
        rng = np.random.default_rng(0)
        batch = (tf.constant(rng.uniform(0, 255, (32, 128, 128, 3)).astype("float32")),
                 tf.constant(rng.integers(0, 81313, 32).astype("int32")))
        data = iter([batch] * 12)
        train_step(data); train_step(data)   # trace, warm up
        t = time.perf_counter()
        for _ in range(10):
            float(train_step(data)[0])
        row["step_seconds_batch32_128px"] = round((time.perf_counter() - t) / 10, 3)
        row["peak_rss_mb"] = round(peak_mb())
    out[backbone] = row
print(json.dumps(out))
"""


def arcface(args):
    seconds, rss, stdout, _ = timed([sys.executable, "-c", ARCFACE_SCRIPT])
    rows = json.loads(stdout.strip().splitlines()[-1])
    r50, small = rows["resnet50"], rows["small"]
    body = f"""The ArcFace head at GLDv2-clean's 81,313 classes (D = 512).

| model | trainable parameters | of them ArcFace proxies | all-reduced per step (float32 gradient) |
|---|---:|---:|---:|
| ResNet50 + DPLG head | {r50['trainable_parameters'] / 1e6:.1f} M | {r50['arcface_parameters'] / 1e6:.1f} M | {r50['allreduce_mb_per_step']} MiB |
| small backbone + DPLG head | {small['trainable_parameters'] / 1e6:.1f} M | {small['arcface_parameters'] / 1e6:.1f} M | {small['allreduce_mb_per_step']} MiB |

A training step of the small model with the 81,313-class head, batch 32 at
128x128, on this CPU: {small['step_seconds_batch32_128px']} s (mean of 10 after 2 warm-up
steps); the peak RSS of the process (which also built the ResNet50 model) {small['peak_rss_mb']} MB
(weights, SGD momentum and the gradient of the {small['arcface_parameters'] / 1e6:.1f} M proxies). The proxies' gradient is
dense (every class's cosine enters the softmax), so each step all-reduces the
whole {r50['allreduce_mb_per_step']} MiB for ResNet50: at 8 GPUs on one host (ring
all-reduce, 2 x (n-1)/n of it per GPU) about {2 * 7 / 8 * r50['allreduce_mb_per_step']:.0f} MiB
cross each GPU's link per step.
Command: `python benchmarks/scale.py --parts arcface`."""
    print(body)
    record("Scale: the ArcFace head at 81,313 classes", body)


DISTRACTOR_SCRIPT = r"""
import sys
import numpy as np
from dplg_tf.retrieval.describers import Describer
from dplg_tf.storage.descriptors import write_npz
model, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
probe = Describer(model=model).probe()
rng = np.random.default_rng(0)
dim = probe.shape[0]
centres = rng.normal(size=(max(1, n // 200), dim)).astype(np.float32)
rows = np.empty((n, dim), np.float32)
for start in range(0, n, 100000):
    part = centres[rng.integers(0, len(centres), min(100000, n - start))]
    part = part + 0.6 * rng.normal(size=part.shape).astype(np.float32)
    rows[start:start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
write_npz(out, [f"d{i}" for i in range(n)], rows, probe)
"""


def _prepare(work):
    """The synthetic set and an export of the demo model (untrained, seeded)."""
    data, model = os.path.join(work, "data"), os.path.join(work, "model")
    if not os.path.isdir(os.path.join(data, "synthetic")):
        subprocess.run([sys.executable, "-m", "dplg_tf.cli.synthetic", f"--output_dir={data}"],
                       check=True, env=ENV, capture_output=True)
    if not os.path.isdir(model):
        subprocess.run([sys.executable, "-m", "dplg_tf.cli.export", "--allow_random_init",
                        f"--config={ROOT}/configs/demo_cpu.py", f"--output_dir={model}"],
                       check=True, env=ENV, capture_output=True)
    return data, model


def evaluation(args):
    data, model = _prepare(args.work)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        path = os.path.join(args.work, f"distractors-{n}.npz")
        if not os.path.isfile(path):
            subprocess.run([sys.executable, "-c", DISTRACTOR_SCRIPT, model, path, str(n)],
                           check=True, env=ENV, capture_output=True)
        modes = {"plain": ("plain", []), "qe": ("+QE k=2", ["--qe_k=2"]),
                 "dba": ("+DBA k=2", ["--dba_k=2", f"--dba_graph={args.dba_graph}"])}
        for mode, extra in [modes[m] for m in args.modes.split(",")]:
            cmd = [sys.executable, "-m", "dplg_tf.cli.eval", "--dataset=synthetic",
                   f"--data_root={data}", f"--model={model}", f"--distractors={path}",
                   f"--output_dir={os.path.join(args.work, 'eval')}"] + extra
            seconds, rss, stdout, stderr = timed(cmd)
            recall = re.search(r"recall@\d+ ([\d.]+)", stderr)
            medium = re.search(r"\| Medium \| ([\d.]+)", stdout)
            rows.append((n, mode, seconds, rss, recall.group(1) if recall else "exact",
                         medium.group(1) if medium else "?"))
            print(rows[-1], flush=True)
    table = "\n".join(f"| {n:,} | {mode} | {s:.0f} | {rss:.0f} | {graph} | {m} |"
                      for n, mode, s, rss, graph, m in rows)
    body = f"""`dplg-eval` on the synthetic set (database and queries cached after the
first run) with N generated distractors: clustered unit vectors (N/200
centres), written as a dplg-client .npz carrying the model's probe. Untrained
demo model (seeded), so mAP is low and only shows that each run completed.

| distractors | mode | wall s | peak RSS MB | DBA graph (recall@2) | mAP Medium |
|---:|---|---:|---:|---|---:|
{table}

Command: `python benchmarks/scale.py --work /tmp/scale --parts eval --sizes {args.sizes}` \
`--modes {args.modes} --dba_graph {args.dba_graph}`."""
    print(body)
    section = "Scale: dplg-eval with distractors"
    if (args.modes, args.dba_graph) != ("plain,qe,dba", "auto"):   # kept beside the full run
        section += f" ({args.modes}, --dba_graph={args.dba_graph})"
    record(section, body)


SERVE_SCRIPT = r"""
import io, json, sys, threading, time
import numpy as np
import grpc
from PIL import Image
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from dplg_tf.serving.server import Server

model, workers, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = Server(model, "dplg", "127.0.0.1", 0, None, poll_seconds=1.0, workers=workers).start()
while srv.manager.current is None:
    time.sleep(0.1)
rng = np.random.default_rng(0)

def jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (96, 128, 3), np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()

blobs = [jpeg(i) for i in range(32)]
def request(n):
    r = predict_pb2.PredictRequest()
    r.model_spec.name = "dplg"
    r.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.array(blobs[:n], dtype=object)))
    return r
kinds = {"small": (request(1), 10.0), "large": (request(32), 60.0)}
stats = {k: {"latency": [], "rejected": 0, "deadline_exceeded": 0, "late": 0, "other": 0}
         for k in kinds}
lock, stop_at = threading.Lock(), time.time() + seconds
channel = grpc.insecure_channel(srv.address)
stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

def client(kind):
    req, deadline = kinds[kind]
    while time.time() < stop_at:
        t = time.time()
        try:
            stub.Predict(req, timeout=deadline)
            outcome = None
        except grpc.RpcError as e:
            outcome = e.code()
        took = time.time() - t
        with lock:
            s = stats[kind]
            if took > deadline + 1.0:
                s["late"] += 1
            if outcome is None:
                s["latency"].append(took)
            elif outcome == grpc.StatusCode.RESOURCE_EXHAUSTED:
                s["rejected"] += 1
                time.sleep(0.05)
            elif outcome == grpc.StatusCode.DEADLINE_EXCEEDED:
                s["deadline_exceeded"] += 1
            else:
                s["other"] += 1

threads = [threading.Thread(target=client, args=("large" if i % 4 == 0 else "small",))
           for i in range(4 * workers)]
for t in threads:
    t.start()
for t in threads:
    t.join(seconds + 120)
hung = sum(t.is_alive() for t in threads)
out = {"clients": len(threads), "hung": hung}
for kind, s in stats.items():
    lat = np.array(s.pop("latency")) if s["latency"] else np.zeros(1)
    out[kind] = dict(s, ok=int(len(lat)), p50=round(float(np.percentile(lat, 50)), 3),
                     p99=round(float(np.percentile(lat, 99)), 3))
srv.stop(5)
print(json.dumps(out))
"""


def serve(args):
    _, model = _prepare(args.work)
    workers = 4
    _, rss, stdout, _ = timed([sys.executable, "-c", SERVE_SCRIPT, model, str(workers),
                               str(args.seconds)])
    out = json.loads(stdout.strip().splitlines()[-1])
    rows = "\n".join(
        f"| {k} | {out[k]['ok']} | {out[k]['p50']} | {out[k]['p99']} | {out[k]['rejected']} | "
        f"{out[k]['deadline_exceeded']} | {out[k]['late']} | {out[k]['other']} |"
        for k in ("small", "large"))
    body = f"""dplg-serve (in-process `Server`, --grpc_workers={workers}, default batching,
maximum_concurrent_rpcs 4 x workers) under {out['clients']} concurrent clients
(4x the workers) for {args.seconds:.0f} s: three in four send 1 JPEG (deadline 10 s),
one in four 32 JPEGs (deadline 60 s), each again as soon as answered (50 ms
after a refusal). Untrained demo model.

| requests | answered | p50 s | p99 s | RESOURCE_EXHAUSTED | DEADLINE_EXCEEDED | past deadline + 1 s | other errors |
|---|---:|---:|---:|---:|---:|---:|---:|
{rows}

Hung clients at the end: {out['hung']}. Peak RSS of the process (server and
clients): {rss:.0f} MB.
Command: `python benchmarks/scale.py --parts serve --seconds {args.seconds:.0f}`."""
    print(body)
    record("Scale: the server under sustained load", body)


IMAGES_SCRIPT = r"""
import io, os, sys
import numpy as np
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
for c in range(max(1, n // 10)):   # classes of 10 images, for the whitening's pairs
    os.makedirs(os.path.join(out, f"c{c:04d}"), exist_ok=True)
for i in range(n):
    image = rng.integers(0, 255, (64, 80, 3), np.uint8)
    Image.fromarray(image).save(os.path.join(out, f"c{i // 10:04d}", f"{i:06d}.jpg"), quality=85)
"""


def streaming(args):
    """Peak RSS of dplg-index on image folders and dplg-whiten on records of
    two sizes: flat means the images are streamed, not held."""
    _, model = _prepare(args.work)
    rows = []
    for n in [int(v) for v in args.stream_sizes.split(",")]:
        folder = os.path.join(args.work, f"images-{n}")
        if not os.path.isdir(folder):
            subprocess.run([sys.executable, "-c", IMAGES_SCRIPT, folder, str(n)], check=True)
        shards = os.path.join(args.work, f"shards-{n}")
        if not os.path.isdir(shards):
            subprocess.run([sys.executable, "-m", "dplg_tf.cli.build_tfrecords",
                            f"--image_dir={folder}", f"--output_dir={shards}", "--num_shards=4"],
                           check=True, env=ENV, capture_output=True)
        index = os.path.join(args.work, f"index-{n}")
        seconds, rss, _, _ = timed([sys.executable, "-m", "dplg_tf.cli.index",
                                    f"--index_dir={index}", f"--model={model}", "--overwrite",
                                    folder])
        rows.append(("dplg-index (image folder)", n, seconds, rss))
        seconds, rss, _, _ = timed([sys.executable, "-m", "dplg_tf.cli.whiten", f"--model={model}",
                                    f"--records={shards}/train-*", "--kind=pca", "--dim=64",
                                    f"--output={os.path.join(args.work, f'w-{n}.npz')}"])
        rows.append(("dplg-whiten (records)", n, seconds, rss))
        print(rows[-2:], flush=True)
    table = "\n".join(f"| {what} | {n:,} | {s:.0f} | {rss:.0f} |" for what, n, s, rss in rows)
    body = f"""Peak RSS (VmHWM) of the commands that read many images, at two sizes: the
images (64x80 JPEGs) are read a batch at a time, so memory stays flat; only
the descriptors (N x 512 floats) grow with N. Untrained demo model, 5 scales.

| command | images | wall s | peak RSS MB |
|---|---:|---:|---:|
{table}

Command: `python benchmarks/scale.py --parts streaming --stream_sizes {args.stream_sizes}`."""
    print(body)
    record("Scale: dplg-index and dplg-whiten memory", body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/dplg_scale")
    parser.add_argument("--parts", default="arcface,eval")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--modes", default="plain,qe,dba", help="of plain, qe, dba")
    parser.add_argument("--dba_graph", default="auto", choices=("auto", "exact", "ivf"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--stream_sizes", default="1000,10000")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    parts = {"arcface": arcface, "eval": evaluation, "serve": serve, "streaming": streaming}
    for name in args.parts.split(","):
        parts[name](args)


if __name__ == "__main__":
    main()

"""dplg-extract (Ray Data) against the serial in-process SavedModel loop.

On one set of generated JPEGs of mixed sizes (4:3, 3:4, 16:9), with the
paper's model (ResNet50, dplg head, random weights: the cost does not depend
on them) at the paper's 5 scales:

- serial: one process loads the SavedModel and calls serving_default once
  per image (what dplg-client / dplg-eval did);
- batched, in-process: dplg_tf.retrieval.describers.Describer.describe_rows without Ray (how much the
  same-size batches alone give);
- dplg-extract with 1 and 2 workers (whole command: Ray start, model load,
  shards written).

Each is timed end to end (process start to exit) and in steady state
(from the first described image to the last). Then the driver's peak RSS
of dplg-extract for N and 10 N images (small model, small images), and how
full the same-size batches are for a few size mixes.
`--decode` instead measures what the CPU side costs per image: reading
and checking the header, and the SavedModel's decode_limited (decode and
the 1024 limit) of 4032x3024 camera-sized and 1024x768 JPEGs, one thread.
Usage: python benchmarks/extraction_bulk.py [--images 200] [--side 512] [--decode]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import record  # noqa: E402

SERIAL = """
import json, sys, time
t0 = time.time()
import tensorflow as tf
from dplg_tf.retrieval.describers import Describer
paths = sys.argv[3:]
blobs = [open(p, "rb").read() for p in paths]
if sys.argv[2] == "serial":
    f = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    first = None
    for b in blobs:
        f(image_bytes=tf.constant([b]))["global_descriptor"].numpy()
        first = first or time.time()
else:
    w = Describer(model=sys.argv[1], batch_size=8)
    first = None
    for i in range(0, len(blobs), 32):
        w.describe_rows(blobs[i:i + 32])
        first = first or time.time()
end = time.time()
print(json.dumps({"wall": end - t0, "first": first - t0, "end": end - t0}))
"""


def make_images(folder, count, side, seed=0):
    """JPEGs cycling through 4:3, 3:4 and 16:9 with the long side `side`."""
    from dplg_tf.images.probe import facade_image
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    shapes = [(side * 3 // 4, side), (side, side * 3 // 4), (side * 9 // 16, side)]
    paths = []
    for i in range(count):
        h, w = shapes[i % 3]
        path = os.path.join(folder, f"img{i:05d}.jpg")
        Image.fromarray(facade_image(h, w, seed=seed + i)).save(path, quality=90)
        paths.append(path)
    return paths


def export_model(base, backbone):
    from dplg_tf.export import export
    from dplg_tf.config import base_config
    from dplg_tf.nn.model import build_dplg

    config = base_config()
    config.model.backbone = backbone
    if backbone == "small":
        config.model.local_dim = 32
    return export.export(build_dplg(config), base, version=1)


def serial(model, paths, mode):
    out = subprocess.run([sys.executable, "-c", SERIAL, model, mode, *paths],
                         capture_output=True, text=True, check=True)
    t = json.loads(out.stdout.strip().splitlines()[-1])
    return len(paths) / t["wall"], (len(paths) - 1) / (t["end"] - t["first"])


def extract(model, folder, out, workers, images):
    start = time.time()
    run = subprocess.run([sys.executable, "-m", "dplg_tf.cli.extract", f"--model={model}",
                          f"--output_dir={out}", f"--workers={workers}", "--batch_size=8",
                          "--shard_size=100", folder],
                         capture_output=True, text=True)
    wall = time.time() - start
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    progress = json.load(open(os.path.join(out, "progress.json")))
    steady = progress.get("steady_images_per_sec") or progress["images_per_sec"]
    return images / wall, steady, progress["driver_peak_rss_mb"]


def fill(sizes, window=32, batch=8, max_side=1024):
    """Mean images per model call when windows of `window` images are grouped
    by their size after the max_side limit into calls of at most `batch`."""
    def limited(h, w):
        s = min(1.0, max_side / max(h, w))
        return (max(1, round(h * s)), max(1, round(w * s))) if s < 1 else (h, w)

    calls = 0
    for i in range(0, len(sizes), window):
        counts = {}
        for h, w in sizes[i:i + window]:
            key = limited(h, w)
            counts[key] = counts.get(key, 0) + 1
        calls += sum(-(-c // batch) for c in counts.values())
    return len(sizes) / calls


def batching_table(count=2000):
    rng = np.random.default_rng(0)
    phone = [(3024, 4032), (4032, 3024), (1080, 1920), (2250, 4000)]
    mixes = {
        "camera originals, 4:3 / 3:4 / 16:9 in random order": [
            phone[i] for i in rng.integers(0, 4, count)],
        "Revisited-like: 1024x768 or 768x1024 (3:1)": [
            (768, 1024) if r < 0.75 else (1024, 768) for r in rng.random(count)],
        "web images: long side 300-1024, any aspect": [
            (int(a), int(b)) for a, b in rng.integers(300, 1025, (count, 2))],
    }
    rows = [f"| {name} | {fill(sizes):.2f} |" for name, sizes in mixes.items()]
    return "\n".join(["| sizes (2000 images) | images per model call (at most 8) |",
                      "|---|---:|"] + rows)


def decode_cost(work, repeats=20):
    """Seconds per image of the CPU side, for two JPEG sizes, one thread."""
    import tensorflow as tf

    from dplg_tf import images
    from dplg_tf.bulk.reading import read_rows

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    loaded = tf.saved_model.load(export_model(os.path.join(work, "small"), "small"))
    rows = []
    for h, w in ((3024, 4032), (768, 1024)):
        path = make_images(os.path.join(work, f"decode{w}"), 1, w)[0]
        from PIL import Image
        Image.fromarray(np.asarray(Image.open(path).resize((w, h)))).save(path, quality=90)
        data = open(path, "rb").read()
        loaded.decode_limited(tf.constant(data))          # warm up
        t0 = time.perf_counter()
        for _ in range(repeats):
            read_rows([path], images.DEFAULT_LIMITS)
        read = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            loaded.decode_limited(tf.constant(data)).numpy()
        decode = (time.perf_counter() - t0) / repeats
        rows.append(f"| {w}x{h} JPEG ({len(data) // 1024} KiB) | {read * 1000:.2f} | "
                    f"{decode * 1000:.1f} |")
    return "\n".join(["| image | read + header check, ms | decode + 1024 limit, ms |",
                      "|---|---:|---:|"] + rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--decode", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = tempfile.mkdtemp(prefix="dplg_bulk_")
    if args.decode:
        table = decode_cost(work)
        print(table)
        record("Bulk extraction, the CPU side (benchmarks/extraction_bulk.py --decode)", f"""
{table}

One thread; mean of 20 calls on the same file (in the page cache). Read: the bytes
and dplg_tf.bulk.reading's header check; decode: the SavedModel's decode_limited
(decoding, then the antialiased resize to a longest side of 1024).
Command: `python benchmarks/extraction_bulk.py --decode`.
""")
        return
    folder = os.path.join(work, "images")
    paths = make_images(folder, args.images, args.side)
    model = export_model(os.path.join(work, "model"), args.backbone)
    rows = {}
    rows["serial serving_default loop, in-process"] = serial(model, paths, "serial") + (None,)
    rows["same-size batches, in-process (no Ray)"] = serial(model, paths, "batched") + (None,)
    for workers in (1, 2):
        rows[f"dplg-extract --workers={workers}"] = extract(
            model, folder, os.path.join(work, f"out{workers}"), workers, len(paths))
    base = rows["serial serving_default loop, in-process"]
    lines = ["| what | images/s end to end | vs serial | images/s steady | vs serial |",
             "|---|---:|---:|---:|---:|"]
    for name, (e2e, steady, _) in rows.items():
        lines.append(f"| {name} | {e2e:.3f} | {e2e / base[0]:.2f} | {steady:.3f} | "
                     f"{steady / base[1]:.2f} |")
    table = "\n".join(lines)
    print(table)

    small = export_model(os.path.join(work, "small"), "small")
    rss = {}
    for n in (args.images, 10 * args.images):
        tiny = make_images(os.path.join(work, f"tiny{n}"), n, 64, seed=7)
        rss[n] = extract(small, os.path.dirname(tiny[0]), os.path.join(work, f"rss{n}"), 1,
                         n)[2]
    memory = ", ".join(f"{n} images: {mb:.0f} MB" for n, mb in rss.items())
    print("driver peak RSS:", memory)
    batching = batching_table()
    print(batching)
    record("Bulk extraction (benchmarks/extraction_bulk.py)", f"""
{table}

{args.images} JPEGs cycling 4:3 / 3:4 / 16:9, long side {args.side}; {args.backbone} with the
dplg head, random weights, the paper's 5 scales. End to end: process start to exit
(TensorFlow import, model load, for dplg-extract also the Ray start and the Parquet
shards); steady: from the first described image (serial) or the first returned
batch of 32 to the last. With few images dplg-extract returns only a few batches, and
batches finished together arrive together, so its steady figure is coarse and
flattering: read the end-to-end column.
dplg-extract: --batch_size=8 --shard_size=100, local Ray on this machine.

Driver peak RSS of dplg-extract (small model, 64-px images): {memory}.

How full same-size batches are (windows of 32 images, the actor's batch, grouped by the
size after the 1024 limit):

{batching}

Command: `python benchmarks/extraction_bulk.py --images {args.images} --side {args.side}`.
""")


if __name__ == "__main__":
    main()

"""Input pipeline and TFRecord builder throughput on this machine.

Generates about-800x600 synthetic JPEGs, builds shards from them (records/s
of dplg-build-tfrecords), then times the training pipeline at 512x512
(random resized crop from the JPEG, flip; images/s after a warm-up).
Usage: python benchmarks/input_pipeline.py [--images N] [--batches N]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import record  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from dplg_tf.config import base_config
    from dplg_tf.data import pipeline, synthetic, tfrecords

    work = tempfile.mkdtemp(prefix="dplg_bench_")
    try:
        views = max(1, args.images // 20)
        synthetic.generate(work, num_landmarks=20, views_per_landmark=views,
                           num_eval_landmarks=1, queries_per_landmark=1, db_per_landmark=3,
                           num_distractors=0, width=800, height=600, num_workers=args.workers,
                           progress=False)
        items, _ = tfrecords.list_image_dir(os.path.join(work, "train"))
        out = os.path.join(work, "shards")
        start = time.perf_counter()
        summary = tfrecords.build(out, items, num_shards=8, num_workers=args.workers,
                                  progress=False)
        build_s = time.perf_counter() - start
        records = summary["train_records"] + summary["validation_records"]
        print(f"builder: {records} records in {build_s:.2f} s = {records / build_s:.1f} records/s")

        c = base_config().data
        c.image_size = 512
        c.shuffle_buffer = 256
        ds = iter(pipeline.make_dataset(out + "/train-*", c, True, args.batch_size))
        for _ in range(5):  # warm-up: threads, autotune, file cache
            next(ds)
        start = time.perf_counter()
        for _ in range(args.batches):
            images, _ = next(ds)
        images.numpy()
        pipe_s = time.perf_counter() - start
        rate = args.batches * args.batch_size / pipe_s
        print(f"pipeline: {args.batches} batches of {args.batch_size} at 512x512 in "
              f"{pipe_s:.2f} s = {rate:.1f} images/s")
        record("Input pipeline (benchmarks/input_pipeline.py)", f"""
| what | figure |
|---|---|
| dplg-build-tfrecords, {records} JPEGs of 800x600, 8 shards, {args.workers} workers | {records / build_s:.1f} records/s |
| training pipeline at 512x512 (random resized crop from JPEG, flip), batch {args.batch_size} | {rate:.1f} images/s |

Command: `python benchmarks/input_pipeline.py --images {args.images} --batches {args.batches}`.
The builder keeps the bytes of baseline RGB JPEGs (no re-encode), so its rate is
mostly the full decode that checks each image.
""")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

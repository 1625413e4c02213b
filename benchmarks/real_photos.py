"""Real photos: a colour histogram, the off-the-shelf export, finetune_cpu and demo_cpu.

    python benchmarks/real_photos.py --photos=PHOTOS --workdir=/tmp/real_photos [--record]

PHOTOS holds one folder of photos per group (a product, a building, ...) and
optionally a `groups.csv` (relative_path, group, split): photos whose split is
"train" may be used for fine-tuning, the others are the evaluation set;
without it, the first `--train_per_group` photos of each group (sorted) are
the training candidates. Fine-tuning takes at most `--train_per_group` photos
of each group. Evaluation (Revisited-style): `--queries_per_group` queries a
group, each searched against every evaluation photo; the other photos of its
group are positives and the query itself is junk; mAP and mP@k as
dplg_tf.retrieval.evaluation.compute_map gives them.

The steps are the user's own commands (dplg-build-tfrecords, dplg-train,
dplg-export), run once each and timed; a rerun skips what is done. The
photos we used: the packaged products of the Grocery Store Dataset (Klasson
et al., WACV 2019; github.com/marcusklasson/GroceryStoreDataset, MIT): 31
products, smartphone photos in stores, 348 px.
"""

import argparse
import collections
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def split(photos, train_per_group):
    """(train [(path, group)], evaluation [(path, group)])."""
    table = os.path.join(photos, "groups.csv")
    rows = []
    if os.path.isfile(table):
        with open(table) as f:
            for r in csv.DictReader(f):
                rows.append((os.path.join(photos, r["relative_path"]), r["group"],
                             r.get("split", "")))
    else:
        for group in sorted(os.listdir(photos)):
            folder = os.path.join(photos, group)
            if os.path.isdir(folder):
                names = sorted(os.listdir(folder))
                rows += [(os.path.join(folder, n), group,
                          "train" if i < train_per_group else "test")
                         for i, n in enumerate(names)]
    by_group = collections.defaultdict(list)
    evaluation = []
    for path, group, part in sorted(rows):
        if part == "train":
            by_group[group].append(path)
        else:
            evaluation.append((path, group))
    train = [(p, g) for g, paths in sorted(by_group.items()) for p in paths[:train_per_group]]
    return train, evaluation


def run(stage, command, workdir, log):
    """Run `command` once (a marker file records it and its seconds)."""
    marker = os.path.join(workdir, f"{stage}.done.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return json.load(f)["seconds"]
    print(f"[{stage}] {' '.join(command)}", flush=True)
    start = time.time()
    with open(os.path.join(workdir, f"{stage}.log"), "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.time() - start
    if code != 0:
        sys.exit(f"{stage} failed (exit {code}); see {workdir}/{stage}.log")
    with open(marker, "w") as f:
        json.dump({"seconds": seconds, "command": command}, f)
    log[stage] = seconds
    return seconds


def colour_histogram(paths, bins=8):
    """Joint RGB histograms (bins^3), square-rooted and L2-normalised (Hellinger)."""
    from PIL import Image

    out = np.zeros((len(paths), bins ** 3), np.float32)
    for i, path in enumerate(paths):
        image = np.asarray(Image.open(path).convert("RGB"), np.int64) * bins // 256
        codes = (image[..., 0] * bins + image[..., 1]) * bins + image[..., 2]
        hist = np.bincount(codes.ravel(), minlength=bins ** 3).astype(np.float64)
        out[i] = np.sqrt(hist / hist.sum())
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def describe(model, paths, cache):
    if os.path.isfile(cache):
        return np.load(cache)
    from dplg_tf.retrieval.describers import Describer

    describer = Describer(model=model)
    start = time.time()
    names, rows, errors = describer.describe_files(paths, batch_size=8)
    if errors or names != list(paths):
        sys.exit(f"{model}: {len(errors)} photos were refused: {errors[:3]}")
    print(f"described {len(paths)} photos with {model} in {time.time() - start:.0f} s")
    np.save(cache, rows)
    return rows


def evaluate(descriptors, groups, queries):
    """mAP and mP@k of the queries (indices) against every evaluation photo."""
    from dplg_tf.retrieval.evaluation import compute_map

    groups = np.asarray(groups)
    scores = descriptors @ descriptors[queries].T          # [n_db, n_query]
    ranks = np.argsort(-scores, axis=0, kind="stable")
    gnd = []
    for q in queries:
        same = np.flatnonzero(groups == groups[q])
        gnd.append({"ok": same[same != q], "junk": np.array([q])})
    m, _, pr, _ = compute_map(ranks, gnd)
    return 100 * m, 100 * np.asarray(pr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--train_per_group", type=int, default=12)
    parser.add_argument("--queries_per_group", type=int, default=4)
    parser.add_argument("--finetune_steps", type=int, default=400)
    parser.add_argument("--demo_steps", type=int, default=900)
    parser.add_argument("--about", default=(
        "The packaged products of the Grocery Store Dataset (Klasson et al., WACV 2019; "
        "GitHub marcusklasson/GroceryStoreDataset at fc80ba9, MIT): smartphone photos taken "
        "in shops, 348 px, one folder a product; its train split for fine-tuning, val + "
        "test searched."), help="What the photos are, for RESULTS.md.")
    parser.add_argument("--unseen_groups", type=int, default=0,
                        help="Leave the last N groups (sorted) out of fine-tuning and take "
                             "the queries from them only: retrieval of unseen things.")
    parser.add_argument("--record", action="store_true", help="Write benchmarks/RESULTS.md.")
    args = parser.parse_args()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)

    train, evaluation = split(os.path.abspath(args.photos), args.train_per_group)
    names = sorted({g for _, g in evaluation})
    unseen = set(names[len(names) - args.unseen_groups:]) if args.unseen_groups else set()
    train = [(p, g) for p, g in train if g not in unseen]
    folder = os.path.join(work, "train_images")
    if not os.path.isdir(folder):
        for path, group in train:
            os.makedirs(os.path.join(folder, group), exist_ok=True)
            os.symlink(path, os.path.join(folder, group, os.path.basename(path)))
    print(f"{len(train)} training photos, {len(evaluation)} evaluation photos, "
          f"{len({g for _, g in evaluation})} groups")

    log = {}
    runs = os.path.join(work, "runs")
    models = os.path.join(work, "models")
    steps = {
        "records": [f"{BIN}/dplg-build-tfrecords", f"--image_dir={folder}",
                    f"--output_dir={work}/records", "--num_shards=2"],
        "finetune_cpu": [f"{BIN}/dplg-train", "--config=configs/finetune_cpu.py",
                         f"--config.data.train_pattern={work}/records/train-*",
                         f"--config.train.max_steps={args.finetune_steps}",
                         f"--workdir={runs}/finetune_cpu"],
        "demo_cpu": [f"{BIN}/dplg-train", "--config=configs/demo_cpu.py",
                     f"--config.data.train_pattern={work}/records/train-*",
                     f"--config.train.max_steps={args.demo_steps}",
                     f"--workdir={runs}/demo_cpu"],
        "export_off_the_shelf": [f"{BIN}/dplg-export", "--config=configs/pretrained_lite0.py",
                                 f"--export_dir={models}/off_the_shelf"],
        "whiten_pca": [f"{BIN}/dplg-whiten", f"--model={models}/off_the_shelf",
                       f"--records={work}/records/train-*", "--kind=pca",
                       f"--output={work}/whiten_pca.npz"],
        "whiten_supervised": [f"{BIN}/dplg-whiten", f"--model={models}/off_the_shelf",
                              f"--records={work}/records/train-*", "--kind=supervised",
                              f"--output={work}/whiten_supervised.npz"],
        "export_off_the_shelf_pca": [f"{BIN}/dplg-export", "--config=configs/pretrained_lite0.py",
                                     f"--whitening={work}/whiten_pca.npz",
                                     f"--export_dir={models}/off_the_shelf_pca"],
        "export_off_the_shelf_supervised": [
            f"{BIN}/dplg-export", "--config=configs/pretrained_lite0.py",
            f"--whitening={work}/whiten_supervised.npz",
            f"--export_dir={models}/off_the_shelf_supervised"],
        "export_finetune_cpu": [f"{BIN}/dplg-export", f"--workdir={runs}/finetune_cpu",
                                f"--export_dir={models}/finetune_cpu"],
        "export_demo_cpu": [f"{BIN}/dplg-export", f"--workdir={runs}/demo_cpu",
                            f"--export_dir={models}/demo_cpu"],
    }
    seconds = {stage: run(stage, command, work, log) for stage, command in steps.items()}

    paths = [p for p, _ in evaluation]
    groups = [g for _, g in evaluation]
    by_group = collections.defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    queries = [i for g in sorted(by_group) if not unseen or g in unseen for i in
               by_group[g][::max(1, len(by_group[g]) // args.queries_per_group)]
               [:args.queries_per_group]]

    rows = []
    start = time.time()
    hist = colour_histogram(paths)
    rows.append(("colour histogram (RGB 8x8x8, Hellinger)", hist, time.time() - start))
    for name, label in (("off_the_shelf", "off-the-shelf Lite0 GeM (configs/pretrained_lite0.py)"),
                        ("off_the_shelf_pca", "off-the-shelf + PCA whitening (dplg-whiten)"),
                        ("off_the_shelf_supervised",
                         "off-the-shelf + supervised whitening (dplg-whiten)"),
                        ("finetune_cpu", f"finetune_cpu, {args.finetune_steps} steps"),
                        ("demo_cpu", f"demo_cpu from random init, {args.demo_steps} steps")):
        start = time.time()
        d = describe(os.path.join(models, name), paths, os.path.join(work, f"{name}.npy"))
        rows.append((label, d, time.time() - start))

    table = ["| descriptor | dim | mAP | mP@1 | mP@5 | mP@10 | vs histogram (mAP) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = None
    for label, d, _ in rows:
        m, pr = evaluate(d, groups, queries)
        base = m if base is None else base
        table.append(f"| {label} | {d.shape[1]} | {m:.2f} | {pr[0]:.2f} | {pr[1]:.2f} | "
                     f"{pr[2]:.2f} | {m - base:+.2f} |")
    timing = ["| step | seconds |", "|---|---:|"] + [
        f"| {stage} | {s:.0f} |" for stage, s in seconds.items()]
    text = "\n".join(table)
    print(text)
    print("\n".join(timing))
    body = (f"{args.about}\n\n{len(train)} fine-tuning photos ({args.train_per_group} a group, the "
            f"dataset's train split), {len(evaluation)} evaluation photos (val + test) in "
            f"{len(by_group)} groups, {len(queries)} queries ({args.queries_per_group} a "
            "group" + (f", from the {len(unseen)} groups left out of fine-tuning: products "
                       "never trained on" if unseen else "") +
            "); each query searches all evaluation photos, its group's other photos "
            "are positives, itself junk.\n\n" + text + "\n\nTime of each step (the "
            "commands below, 2 cores):\n\n" + "\n".join(timing) +
            "\n\nCommand: `python benchmarks/real_photos.py --photos=GroceryStoreDataset "
            f"--workdir=... --finetune_steps={args.finetune_steps} "
            f"--demo_steps={args.demo_steps}"
            + (f" --unseen_groups={args.unseen_groups}" if unseen else "") +
            " --record`; the steps it runs:\n\n```\n" +
            "\n".join(" ".join(c).replace(BIN + "/", "").replace(work, "$WORK")
                      for c in steps.values()) + "\n```\n")
    if args.record:
        record("Real photos (benchmarks/real_photos.py)" if not unseen else
               "Real photos, unseen products (benchmarks/real_photos.py --unseen_groups)", body)


if __name__ == "__main__":
    main()

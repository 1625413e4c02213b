"""dplg-build-tfrecords: image folders or GLDv2 to TFRecord shards.

Sources: a folder tree with one sub-folder per class (`--image_dir`), or
Google Landmarks v2 (`--gldv2_csv` = train.csv `id,url,landmark_id` or
train_clean.csv `landmark_id,images`, with `--gldv2_image_dir` laid out as
`a/b/c/<id>.jpg`).

Output in `--output_dir`, readable by the DELG reference pipeline too:
- `train-00000-of-000NN`, `validation-00000-of-000MM`: tf.train.Example
  records with the schema of DESIGN.md (JPEG bytes, id, label 0..C-1, size);
- `relabeling.csv` (`new_label,old_label`, labels in sorted order);
- `dataset_info.json`: classes and record counts, read by the input pipeline;
- `build_report.json` and `bad_files.txt`: every skipped file and why.

Per class, after a shuffle seeded by --seed, max(1, floor(fraction * n))
images go to validation. Each shard is written under a temporary name and
renamed when complete; a rerun skips complete shards, so an interrupted
build resumes where it stopped. Shards are written in parallel threads
(image decoding releases the GIL).
"""

import concurrent.futures
import csv
import hashlib
import io
import json
import math
import os
import threading
import time

import numpy as np
from PIL import Image

from dplg_tf.errors import UserError
from dplg_tf.data.sources import (  # noqa: F401 (list_* are part of this module's API)
    BuildError, list_gldv2, list_image_dir, present)
from dplg_tf.images import DEFAULT_LIMITS
from dplg_tf.storage.atomic import atomic_path, remove_temporaries, write_atomic

STATE_DIR = ".build"  # per-shard results, kept out of the shard glob
MAX_SHARDS = 100_000


# ------------------------------------------------------------- split, shards

def relabel(items):
    """Labels 0..C-1 in sorted order of the original ones: {old: new}."""
    return {old: new for new, old in enumerate(sorted({cls for _, _, cls in items}))}


def split(items, labels, fraction, seed, per_class=0):
    """Per class, a seeded shuffle, then `per_class` images, or max(1,
    floor(fraction * n)), to validation; never all of a class (a class of one
    image stays in training). fraction 0 and per_class 0: all in training."""
    by_class = {}
    for item in items:
        by_class.setdefault(labels[item[2]], []).append(item)
    train, validation = [], []
    for label in sorted(by_class):
        members = by_class[label]
        order = np.random.default_rng([seed, label]).permutation(len(members))
        n_val = per_class or (max(1, math.floor(fraction * len(members))) if fraction > 0 else 0)
        n_val = min(n_val, len(members) - 1)
        validation += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return train, validation


def shard_plan(items, num_shards, seed, prefix):
    """{shard file name: items}, classes mixed by a seeded shuffle."""
    order = np.random.default_rng([seed, len(items)]).permutation(len(items))
    shuffled = [items[i] for i in order]
    return {f"{prefix}-{s:05d}-of-{num_shards:05d}": shuffled[s::num_shards]
            for s in range(num_shards)}


# --------------------------------------------------------------- one image

def _reencode(img, max_size):
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
    if max_size and max(img.size) > max_size:
        scale = max_size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), img.size


def load_image(path, max_size=0):
    """(jpeg_bytes, width, height) of a good image; raises ValueError why not.

    A baseline RGB JPEG within max_size keeps its bytes; anything else
    (PNG, grayscale, CMYK, alpha, too large) is decoded and re-encoded.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError("missing") from None
    except OSError as e:
        raise UserError(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise UserError("empty file")
    from dplg_tf.images import frame_size

    frames = frame_size(data)  # every frame of a GIF, before any decoding
    if frames is not None and frames[2] > DEFAULT_LIMITS.max_pixels:
        raise UserError(f"too large: its frames hold {frames[2]} pixels")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > DEFAULT_LIMITS.max_pixels:
            raise UserError(f"too large: {img.width}x{img.height} pixels")
        img.load()  # a full decode: truncated and corrupt files fail here
    except ValueError:
        raise
    except Image.UnidentifiedImageError:
        raise UserError("not an image") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        raise UserError(f"corrupt image: {e}") from None
    if img.format == "JPEG" and img.mode == "RGB" and not (max_size and max(img.size) > max_size):
        return data, img.width, img.height
    jpeg, (w, h) = _reencode(img, max_size)
    return jpeg, w, h


def _id_bytes(image_id):
    """An id as bytes: UTF-8, and a file name's undecodable bytes as they were
    on disk (os.fsdecode's surrogate escapes), so os.fsdecode gives it back."""
    return str(image_id).encode("utf-8", "surrogateescape")


def make_example(jpeg, image_id, label, width, height):
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": b(jpeg), "image/id": b(_id_bytes(image_id)),
        "image/class/label": i(label), "image/height": i(height), "image/width": i(width),
        "image/channels": i(3), "image/format": b(b"JPEG"), "image/colorspace": b(b"RGB"),
    }))


# ---------------------------------------------------------------- the build

def _fingerprint(plans, labels, max_size):
    h = hashlib.sha256()
    h.update(json.dumps(max_size).encode())
    for name in sorted(plans):
        h.update(name.encode())
        for path, image_id, cls in plans[name]:
            h.update(f"{path}\0{image_id}\0{labels[cls]}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _write_shard(output_dir, name, items, labels, max_size, progress):
    """Write one shard atomically; returns its result dict."""
    import tensorflow as tf

    state = os.path.join(output_dir, STATE_DIR)
    records, bad = 0, []
    # the temporary lies in STATE_DIR, out of the shard glob
    with atomic_path(os.path.join(output_dir, name), tmp_dir=state) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for path, image_id, cls in items:
                try:
                    jpeg, w, h = load_image(path, max_size)
                except ValueError as e:
                    bad.append([path, str(e)])
                else:
                    writer.write(make_example(jpeg, image_id, labels[cls], w,
                                              h).SerializeToString())
                    records += 1
                progress()
        result = {"shard": name, "records": records, "bad": bad}
        write_atomic(os.path.join(state, name + ".json"), json.dumps(result))
    return result


def _done_result(output_dir, name):
    state = os.path.join(output_dir, STATE_DIR, name + ".json")
    if os.path.isfile(os.path.join(output_dir, name)) and os.path.isfile(state):
        with open(state) as f:
            return json.load(f)
    return None


def build(output_dir, items, num_shards=8, num_validation_shards=0, validation_fraction=0.0,
          seed=0, max_image_size=0, num_workers=4, overwrite=False, progress=True,
          ignored=0, log=print, listing_problems=(), validation_per_class=0, excluded=None):
    """Build the shards of `items` [(path, image_id, class)]; returns the summary.

    Every image goes to training unless a validation split is asked for
    (`validation_fraction` of each class, or `validation_per_class` images of
    each), as the paper and DELG's builder train on all of GLDv2-clean.
    `excluded` (sources.exclude_landmarks' account) goes into build_report.json."""
    if not 1 <= num_shards <= MAX_SHARDS:
        raise BuildError(f"--num_shards must lie in [1, {MAX_SHARDS}], got {num_shards}.")
    if not 0 <= validation_fraction < 1:
        raise BuildError(f"--validation_fraction must lie in [0, 1), got {validation_fraction}.")
    if validation_per_class < 0 or (validation_per_class and validation_fraction):
        raise BuildError("Give --validation_fraction or --validation_per_class (>= 0), "
                         "not both.")
    if not 0 <= num_validation_shards <= MAX_SHARDS or max_image_size < 0:
        raise BuildError(f"--num_validation_shards must lie in [0, {MAX_SHARDS}] and "
                         f"--max_image_size be >= 0, got {num_validation_shards} and "
                         f"{max_image_size}.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise BuildError(f"--output_dir {output_dir!r} is a file, not a folder.")
    start = time.perf_counter()
    items, missing = present(items)
    missing = list(listing_problems) + missing
    if not items:
        raise BuildError("None of the listed images exists or is non-empty; "
                         "check --image_dir / --gldv2_image_dir.")
    labels = relabel(items)
    train, validation = split(items, labels, validation_fraction, seed, validation_per_class)
    num_validation_shards = min(len(validation) or 1, num_validation_shards or max(
        1, round(num_shards * (validation_fraction or len(validation) / len(items)))))
    num_shards = min(num_shards, len(train))  # no empty shard (a worker would get no data)
    plans = shard_plan(train, num_shards, seed, "train")
    if validation:
        plans.update(shard_plan(validation, num_validation_shards, seed, "validation"))
    _claim(output_dir, _fingerprint(plans, labels, max_image_size), overwrite)
    results, todo = {}, []
    for name, shard_items in plans.items():
        done = _done_result(output_dir, name)
        if done is not None:
            results[name] = done
        else:
            todo.append((name, shard_items))
    total = sum(len(i) for _, i in todo)
    if results:
        log(f"resuming: {len(results)} of {len(plans)} shards are complete, "
            f"{len(todo)} to write ({total} images)")
    results.update(_write_shards(output_dir, todo, labels, max_image_size, num_workers,
                                 progress))
    return _finish(output_dir, plans, results, labels, len(items) + len(missing), missing,
                   ignored, start, len(todo), total, excluded)


def _claim(output_dir, fingerprint, overwrite):
    """Make `output_dir` this build's: refuse another build's shards unless
    `overwrite`, which removes them."""
    os.makedirs(os.path.join(output_dir, STATE_DIR), exist_ok=True)
    remove_temporaries(os.path.join(output_dir, STATE_DIR))   # shards of a killed build
    plan_path = os.path.join(output_dir, STATE_DIR, "plan.json")
    if os.path.isfile(plan_path) and not overwrite:
        with open(plan_path) as f:
            if json.load(f).get("fingerprint") != fingerprint:
                raise BuildError(
                    f"{output_dir!r} holds shards of a different build (other images, "
                    "shard counts, seed or size); use a new --output_dir or --overwrite.")
    if overwrite:
        for name in os.listdir(output_dir):
            if name.startswith(("train-", "validation-")):
                os.remove(os.path.join(output_dir, name))
        for name in os.listdir(os.path.join(output_dir, STATE_DIR)):
            os.remove(os.path.join(output_dir, STATE_DIR, name))
    write_atomic(plan_path, json.dumps({"fingerprint": fingerprint}))


def _write_shards(output_dir, todo, labels, max_image_size, num_workers, progress):
    """Writes the shards of `todo` [(name, items)] in threads; {name: result}."""
    from dplg_tf.console import progress_bar

    total = sum(len(i) for _, i in todo)
    results = {}
    bar = progress_bar(total, "images", enabled=progress)
    lock = threading.Lock()

    def tick():
        with lock:
            bar.update(1)

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        futures = [pool.submit(_write_shard, output_dir, name, shard_items, labels,
                               max_image_size, tick) for name, shard_items in todo]
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results[r["shard"]] = r
    bar.close()
    return results


def _finish(output_dir, plans, results, labels, listed, missing, ignored, start, written,
            total, excluded=None):
    with atomic_path(os.path.join(output_dir, "relabeling.csv")) as tmp, \
            open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["new_label", "old_label"])
        for old, new in sorted(labels.items(), key=lambda kv: kv[1]):
            w.writerow([new, old])
    bad = sorted([b for r in results.values() for b in r["bad"]] + missing,
                 key=lambda b: b[0])
    splits = {}
    for prefix in ("train", "validation"):
        names = sorted(n for n in plans if n.startswith(prefix + "-"))
        if names:
            splits[prefix] = {
                "num_records": sum(results[n]["records"] for n in names),
                "num_shards": len(names),
                "pattern": f"{prefix}-*-of-{len(names):05d}"}
    seconds = time.perf_counter() - start
    info = {"num_classes": len(labels), "splits": splits,
            "schema": "DELG-compatible tf.train.Example (see DESIGN.md)"}
    write_atomic(os.path.join(output_dir, "dataset_info.json"), json.dumps(info, indent=1))
    from dplg_tf.images import display_name

    bad = [(display_name(p), r) for p, r in bad]
    records = {f"{k}_records": splits.get(k, {}).get("num_records", 0)
               for k in ("train", "validation")}
    report = {"listed_images": listed, "ignored_non_image_files": ignored,
              "bad_files": len(bad), "bad": [{"path": p, "reason": r} for p, r in bad],
              **records}
    if excluded is not None:
        report["excluded_landmarks"] = excluded
    write_atomic(os.path.join(output_dir, "build_report.json"), json.dumps(report, indent=1))
    write_atomic(os.path.join(output_dir, "bad_files.txt"),  # one line per file
                 "".join(f"{display_name(p)}\t{r}\n" for p, r in bad))
    return {"num_classes": len(labels), **records,
            "bad_files": len(bad), "shards_written": written,
            "shards_total": len(plans), "images_processed": total,
            "seconds": round(seconds, 2),
            "images_per_second": round(total / seconds, 1) if seconds > 0 else 0.0}


# -------------------------------------------------------------------- CLI

"""Procedural synthetic landmarks: the default data of the demo and the tests.

Each landmark is a distinct textured planar scene (a facade of windows,
stripes, discs and marks drawn from its own seed). A view pastes the
landmark into a cluttered background through a homography (viewpoint),
with scale, rotation, crop, illumination and colour change, blur, noise and
occluders. Distractors are clutter alone.

`generate(out_dir, ...)` writes
- `train/<landmark>/<view>.jpg`: the training tree, one folder per landmark;
- `synthetic/jpg/*.jpg` and `synthetic/gnd_synthetic.pkl`: an evaluation set on other
  landmarks in the Revisited Oxford/Paris layout (`imlist`, `qimlist`, and
  per query `bbx`, `easy`, `hard`, `junk`): easy = mild view change, hard =
  strong change or heavy occlusion, junk = landmark barely visible.

Every image has its own random generator seeded by (seed, kind, landmark,
view), so output is byte-identical for a seed, with any number of workers.
"""

import functools
import io
import json
import math
import multiprocessing
import os
import pickle
import time

import numpy as np

from dplg_tf.errors import UserError
from PIL import Image, ImageDraw, ImageFilter

from dplg_tf.storage.atomic import write_atomic

TEXTURE_SIZE = 256
# Kinds of image, part of each image's seed.
_TRAIN, _QUERY, _DB, _DISTRACTOR, _TEXTURE = range(5)


def _rng(seed, *keys):
    return np.random.default_rng([seed, *keys])


def _colour(rng, lo=0, hi=255):
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


@functools.lru_cache(maxsize=64)
def landmark_texture(seed, landmark):
    """The planar scene of one landmark: a TEXTURE_SIZE^2 RGB image."""
    rng = _rng(seed, _TEXTURE, landmark)
    s = TEXTURE_SIZE
    img = Image.new("RGB", (s, s), _colour(rng, 40, 220))
    draw = ImageDraw.Draw(img)
    # horizontal bands (floors) with their own colours
    y = 0
    while y < s:
        h = int(rng.integers(s // 10, s // 4))
        draw.rectangle([0, y, s, y + h], fill=_colour(rng, 30, 230))
        y += h
    # a grid of windows, shape and spacing specific to the landmark
    cols, rows = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    win_colour, frame = _colour(rng, 0, 120), _colour(rng, 120, 255)
    rounded = rng.random() < 0.5
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.15:
                continue
            x0 = (c + 0.2) * s / cols
            y0 = (r + 0.2) * s / rows
            box = [x0, y0, x0 + 0.6 * s / cols, y0 + 0.6 * s / rows]
            if rounded:
                draw.ellipse(box, fill=win_colour, outline=frame, width=2)
            else:
                draw.rectangle(box, fill=win_colour, outline=frame, width=2)
    # distinctive marks: discs, diagonal bars, polygons
    for _ in range(int(rng.integers(3, 8))):
        kind = rng.integers(0, 3)
        cx, cy = rng.uniform(0, s, 2)
        r = rng.uniform(s / 20, s / 7)
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_colour(rng))
        elif kind == 1:
            draw.line([cx - r, cy - r, cx + r, cy + r], fill=_colour(rng), width=int(r / 3) + 1)
        else:
            angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(3, 6))))
            draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles],
                         fill=_colour(rng))
    # a fine texture so that local features have something to hold on to
    arr = np.asarray(img, np.float32)
    freq = rng.uniform(0.05, 0.3, 2)
    yy, xx = np.mgrid[0:s, 0:s]
    arr += 18 * np.sin(freq[0] * xx + freq[1] * yy)[..., None]
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def clutter(rng, width, height):
    """A cluttered background: a gradient, random shapes and noise."""
    top, bottom = np.array(_colour(rng)), np.array(_colour(rng))
    t = np.linspace(0, 1, height)[:, None, None]
    base = (1 - t) * top + t * bottom
    img = Image.fromarray(np.broadcast_to(base, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 20))):
        x0, x1 = np.sort(rng.uniform(-0.1, 1.1, 2) * width)
        y0, y1 = np.sort(rng.uniform(-0.1, 1.1, 2) * height)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=_colour(rng))
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=_colour(rng))
        else:
            draw.line([x0, y0, x1, y1], fill=_colour(rng), width=int(rng.integers(1, 8)))
    return img


def _perspective_coeffs(dst, src):
    """PIL PERSPECTIVE coefficients mapping output points `dst` to input `src`."""
    a = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(a, np.float64), np.array(src, np.float64).ravel())


# Per difficulty: scale of the landmark (fraction of the shorter side),
# corner jitter (fraction of its size), rotation (degrees), occluded fraction,
# blur radius, illumination gain spread.
_VIEW = {
    "easy": dict(scale=(0.55, 0.85), jitter=0.05, rotation=8, occlusion=(0.0, 0.1),
                 blur=(0.0, 0.6), gain=0.15),
    "hard": dict(scale=(0.35, 0.75), jitter=0.2, rotation=30, occlusion=(0.25, 0.5),
                 blur=(0.3, 1.5), gain=0.4),
    "junk": dict(scale=(0.08, 0.15), jitter=0.15, rotation=20, occlusion=(0.0, 0.3),
                 blur=(0.5, 1.5), gain=0.3),
}


def render_view(texture, rng, width, height, difficulty):
    """Paste `texture` into clutter as one view; returns (image, bbx).

    bbx is the landmark's bounding box in the image (x1, y1, x2, y2), clipped.
    """
    p = _VIEW[difficulty]
    img = clutter(rng, width, height)
    side = rng.uniform(*p["scale"]) * min(width, height)
    cx = rng.uniform(0.5 * side, width - 0.5 * side) if width > side else width / 2
    cy = rng.uniform(0.5 * side, height - 0.5 * side) if height > side else height / 2
    angle = math.radians(rng.uniform(-p["rotation"], p["rotation"]))
    aspect = rng.uniform(0.8, 1.25)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.5
    corners[:, 0] *= side * aspect ** 0.5
    corners[:, 1] *= side / aspect ** 0.5
    corners += rng.uniform(-p["jitter"], p["jitter"], corners.shape) * side
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = corners @ rot.T + [cx, cy]
    s = TEXTURE_SIZE
    src = [(0, 0), (s, 0), (s, s), (0, s)]
    coeffs = _perspective_coeffs(dst, src)
    lit = np.asarray(texture, np.float32) * (1 + rng.uniform(-p["gain"], p["gain"], 3))
    lit += rng.uniform(-25, 25)
    lit = Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))
    warped = lit.transform((width, height), Image.Transform.PERSPECTIVE, coeffs,
                           Image.Resampling.BILINEAR)
    mask = Image.new("L", (s, s), 255).transform(
        (width, height), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR)
    img.paste(warped, (0, 0), mask)
    x1, y1 = np.clip(dst.min(axis=0), 0, [width, height])
    x2, y2 = np.clip(dst.max(axis=0), 0, [width, height])
    # occluders over the landmark's box
    draw = ImageDraw.Draw(img)
    target = rng.uniform(*p["occlusion"]) * (x2 - x1) * (y2 - y1)
    covered = 0.0
    while covered < target:
        w = rng.uniform(0.2, 0.6) * (x2 - x1)
        h = min(target - covered, (y2 - y1) * (x2 - x1)) / max(w, 1.0)
        h = min(max(h, 4.0), y2 - y1)
        ox, oy = rng.uniform(x1 - w / 2, x2 - w / 2), rng.uniform(y1 - h / 2, y2 - h / 2)
        draw.rectangle([ox, oy, ox + w, oy + h], fill=_colour(rng))
        covered += w * h
    blur = rng.uniform(*p["blur"])
    if blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 8), (height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img, [float(x1), float(y1), float(x2), float(y2)]


def _jpeg(img, quality=90):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _task(args):
    """Render and write one image; returns (name, bbx)."""
    path, seed, kind, landmark, view, difficulty, width, height = args
    rng = _rng(seed, kind, landmark, view)
    if difficulty is None:
        img, bbx = clutter(rng, width, height), None
    else:
        img, bbx = render_view(landmark_texture(seed, landmark), rng, width, height, difficulty)
    write_atomic(path, _jpeg(img))
    return path, bbx


def _plan(out_dir, num_landmarks, views_per_landmark, num_eval_landmarks,
          queries_per_landmark, db_per_landmark, num_distractors, width, height, seed):
    """Every image to render, as task tuples, plus the eval ground truth plan."""
    tasks = []
    train_dir = os.path.join(out_dir, "train")
    for k in range(num_landmarks):
        folder = os.path.join(train_dir, f"landmark_{k:04d}")
        os.makedirs(folder, exist_ok=True)
        for v in range(views_per_landmark):
            difficulty = "easy" if v % 3 != 2 else "hard"
            tasks.append((os.path.join(folder, f"{k:04d}_{v:04d}.jpg"), seed, _TRAIN, k, v,
                          difficulty, width, height))
    jpg = os.path.join(out_dir, "synthetic", "jpg")
    os.makedirs(jpg, exist_ok=True)
    imlist, qimlist, db_landmark, db_difficulty, q_landmark = [], [], [], [], []
    rng = _rng(seed, 99)
    for e in range(num_eval_landmarks):
        k = num_landmarks + e  # disjoint from the training landmarks
        for q in range(queries_per_landmark):
            name = f"q_{e:04d}_{q}"
            qimlist.append(name)
            q_landmark.append(k)
            tasks.append((os.path.join(jpg, name + ".jpg"), seed, _QUERY, k, q, "easy",
                          width, height))
        # db views: a fixed share of easy, hard and junk, at least one of each
        n_junk = max(1, db_per_landmark // 6)
        n_hard = max(1, (db_per_landmark - n_junk) // 2)
        n_easy = max(1, db_per_landmark - n_junk - n_hard)
        for v, difficulty in enumerate(["easy"] * n_easy + ["hard"] * n_hard
                                       + ["junk"] * n_junk):
            name = f"db_{e:04d}_{v:03d}"
            imlist.append(name)
            db_landmark.append(k)
            db_difficulty.append(difficulty)
            tasks.append((os.path.join(jpg, name + ".jpg"), seed, _DB, k, v, difficulty,
                          width, height))
    for d in range(num_distractors):
        name = f"distractor_{d:05d}"
        imlist.append(name)
        db_landmark.append(-1)
        db_difficulty.append(None)
        tasks.append((os.path.join(jpg, name + ".jpg"), seed, _DISTRACTOR, 0, d, None,
                      width, height))
    order = rng.permutation(len(imlist))  # database order must not give answers away
    imlist = [imlist[i] for i in order]
    db_landmark = [db_landmark[i] for i in order]
    db_difficulty = [db_difficulty[i] for i in order]
    return tasks, dict(imlist=imlist, qimlist=qimlist, q_landmark=q_landmark,
                       db_landmark=db_landmark, db_difficulty=db_difficulty)


def generate(out_dir, num_landmarks=20, views_per_landmark=30, num_eval_landmarks=10,
             queries_per_landmark=2, db_per_landmark=12, num_distractors=60,
             width=256, height=192, seed=0, num_workers=None, progress=True):
    """Write the training tree and the evaluation set; returns a summary dict."""
    if min(num_landmarks, views_per_landmark, num_eval_landmarks, queries_per_landmark) < 1:
        raise UserError("The synthetic set needs at least one landmark, view, eval "
                         "landmark and query.")
    if db_per_landmark < 3:
        raise UserError("db_per_landmark must be >= 3 (one easy, hard and junk view).")
    if min(width, height) < 64:
        raise UserError(f"Images must be at least 64 px a side, got {width}x{height}.")
    start = time.perf_counter()
    tasks, plan = _plan(out_dir, num_landmarks, views_per_landmark, num_eval_landmarks,
                        queries_per_landmark, db_per_landmark, num_distractors,
                        width, height, seed)
    num_workers = num_workers or os.cpu_count() or 1
    bbx = {}
    from dplg_tf.console import progress_bar

    bar = progress_bar(len(tasks), "synthetic images", enabled=progress)
    if num_workers > 1:
        with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
            for path, box in pool.imap_unordered(_task, tasks, chunksize=8):
                bbx[path] = box
                bar.update(1)
    else:
        for t in tasks:
            path, box = _task(t)
            bbx[path] = box
            bar.update(1)
    bar.close()
    jpg = os.path.join(out_dir, "synthetic", "jpg")
    gnd = []
    for name, k in zip(plan["qimlist"], plan["q_landmark"]):
        entry = {"bbx": [round(v, 2) for v in bbx[os.path.join(jpg, name + ".jpg")]],
                 "easy": [], "hard": [], "junk": []}
        for i, (dk, diff) in enumerate(zip(plan["db_landmark"], plan["db_difficulty"])):
            if dk == k:
                entry[diff].append(i)
        gnd.append(entry)
    cfg = {"imlist": plan["imlist"], "qimlist": plan["qimlist"], "gnd": gnd}
    write_atomic(os.path.join(out_dir, "synthetic", "gnd_synthetic.pkl"),
                 pickle.dumps(cfg, protocol=4))
    seconds = time.perf_counter() - start
    summary = dict(images=len(tasks), train_images=num_landmarks * views_per_landmark,
                   train_classes=num_landmarks, queries=len(plan["qimlist"]),
                   database=len(plan["imlist"]), seconds=round(seconds, 2),
                   images_per_second=round(len(tasks) / seconds, 1), seed=seed)
    write_atomic(os.path.join(out_dir, "synthetic.json"), json.dumps(summary, indent=1))
    return summary

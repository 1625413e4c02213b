"""Learning a whitening of global descriptors (dplg-whiten).

Two kinds, both a mean m and a projection P (out_dim x D) applied as
normalise(P (x - m)):

- `supervised` (Radenovic et al.'s Lw, ECCV 2016 / TPAMI 2019): whiten by
  the covariance of the differences of matching pairs (images of the same
  class), then rotate onto the principal directions of the whitened data.
  Directions along which views of one landmark differ are shrunk.
- `pca`: PCA-whitening of the covariance, with shrinkage: each principal
  direction is divided by sqrt(eigenvalue + shrinkage * mean eigenvalue), so
  that the many small-variance directions are not blown up.

`learn` describes training records with a SavedModel and learns either kind;
the file format is dplg_tf.storage.whitening.
"""


import numpy as np

from dplg_tf.errors import UserError

KINDS = ("supervised", "pca")


def _check(x, dim):
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise UserError(f"Whitening needs finite descriptors [N, D], got shape {x.shape}.")
    if not 0 < dim <= x.shape[1]:
        raise UserError(f"The whitened dimension must lie in 1..{x.shape[1]}, got {dim}.")
    return x


def learn_pca(x, dim, shrinkage=0.1):
    """(mean [D], projection [dim, D]) of PCA-whitening with shrinkage."""
    x = _check(x, dim)
    if len(x) < 2:
        raise UserError("PCA-whitening needs at least 2 descriptors.")
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:dim]
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
    scale = 1.0 / np.sqrt(values + shrinkage * max(values.mean(), 1e-12))
    return mean.astype(np.float32), (vectors * scale).T.astype(np.float32)


def matching_pairs(labels, max_pairs=200_000, seed=0):
    """(i, j) index arrays of images of the same class, i != j: every pair when
    there are at most `max_pairs`, else a sample drawn class by class in
    proportion to its pairs (never building them all: memory O(max_pairs))."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    pairs = counts * (counts - 1) // 2
    total = int(pairs.sum())
    if total == 0:
        raise UserError("Supervised whitening needs at least one class with two images.")
    first, second = [], []
    if total <= max_pairs:
        for start, n in zip(starts[counts > 1], counts[counts > 1]):
            i, j = np.triu_indices(n, 1)
            first.append(order[start + i])
            second.append(order[start + j])
    else:
        share = rng.multinomial(max_pairs, pairs / total)   # pairs to draw per class
        for start, n, k in zip(starts, counts, share):
            if k == 0:
                continue
            i = rng.integers(0, n, k)
            j = (i + rng.integers(1, n, k)) % n   # another member of the class
            first.append(order[start + i])
            second.append(order[start + j])
    return np.concatenate(first), np.concatenate(second)


def learn_supervised(x, labels, dim, ridge=1e-6):
    """(mean [D], projection [dim, D]) of Lw from class labels."""
    x = _check(x, dim)
    i, j = matching_pairs(labels)
    mean = x.mean(axis=0)
    within = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(i), 16384):   # the pairs' differences, a block at a time
        diff = x[i[start:start + 16384]] - x[j[start:start + 16384]]
        within += diff.T @ diff
    within /= len(i)
    within += ridge * np.trace(within) / len(within) * np.eye(len(within))
    whiten = np.linalg.inv(np.linalg.cholesky(within))  # within^-1/2 up to a rotation
    white = (x - mean) @ whiten.T
    values, vectors = np.linalg.eigh(white.T @ white)
    order = np.argsort(values)[::-1][:dim]
    projection = vectors[:, order].T @ whiten
    return mean.astype(np.float32), projection.astype(np.float32)


def apply(x, mean, projection):
    """normalise(P (x - m)) for descriptors x [N, D]."""
    y = (np.asarray(x, np.float32) - mean) @ np.asarray(projection, np.float32).T
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def describe_records(describer, pattern, max_images=0, batch_size=16, progress=True):
    """(descriptors [N, D] float32, labels [N]) of the records matching `pattern`,
    read and described a batch at a time (the encoded images are never all in
    memory), through the SavedModel's serving_default."""
    from dplg_tf.console import progress_bar
    from dplg_tf.data.pipeline import record_batches

    bar = progress_bar(max_images or None, "images", enabled=progress)
    rows, labels = [], []
    for blobs, batch_labels in record_batches(pattern, max_images, batch_size):
        rows.append(np.asarray(describer.describe_bytes(blobs), np.float32))
        labels.append(batch_labels)
        bar.update(len(batch_labels))
    bar.close()
    return np.concatenate(rows), np.concatenate(labels)


SHRINKAGES = (0.01, 0.1, 0.3, 1.0)   # pca: the shrinkages tried when none is given
DEFAULT_SHRINKAGE = 0.1              # pca, when nothing is measured


def split_classes(labels, fraction, seed=0):
    """(train mask, held-out mask) of the records: `fraction` of the classes
    with two images or more held out whole (at least 2 such classes)."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    several = classes[counts > 1]
    n = int(np.ceil(fraction * len(several)))
    if n < 2 or len(several) - n < 1:
        raise UserError(f"Holding out {fraction:g} of the classes leaves {n} held-out and "
                        f"{len(several) - n} training classes with two images or more; the "
                        "whitening's effect cannot be measured: use more records, another "
                        "--holdout_fraction, or --holdout_fraction=0 to skip the check.")
    held = np.isin(labels, np.random.default_rng(seed).permutation(several)[:n])
    return ~held, held


def _fit(x, labels, kind, dim, shrinkage):
    if kind == "supervised":
        return learn_supervised(x, labels, dim)
    return learn_pca(x, dim, shrinkage)


def held_out_table(x, labels, kind, dims, shrinkages, fraction, seed=0, held_out=None):
    """(held-out mAP of the raw descriptors, [(dim, shrinkage, held-out mAP)]
    of each setting learned on the training classes, best first). The
    held-out set is `fraction` of the classes of `x`, or `held_out` (x, labels)
    when given (then every row of `x` trains)."""
    from dplg_tf.retrieval.evaluation import labelled_map

    if held_out is None:
        train, held = split_classes(labels, fraction, seed)
        x_train, l_train, x_held, l_held = x[train], labels[train], x[held], labels[held]
    else:
        (x_train, l_train), (x_held, l_held) = (x, labels), held_out
    raw = labelled_map(x_held, l_held)
    rows = []
    for dim in dims:
        for shrinkage in (shrinkages if kind == "pca" else (None,)):
            mean, projection = _fit(x_train, l_train, kind, dim, shrinkage)
            rows.append((dim, shrinkage, labelled_map(apply(x_held, mean, projection),
                                                      l_held)))
    rows.sort(key=lambda row: (-row[2], -row[0]))
    return raw, rows


def learn(describer, pattern, kind, dim, max_images=0, shrinkage=None, progress=True,
          holdout_fraction=0.2, seed=0, holdout_records=None):
    """(mean, projection, metadata) learned on the records of `pattern`.

    With `holdout_fraction` > 0 the settings (the dimension unless `dim`,
    pca's shrinkage unless `shrinkage`) are chosen by the mAP of held-out
    classes (held_out_table), then learned on every record; metadata
    "held_out" keeps the table. The held-out classes are a share of
    `pattern`'s, or the records of `holdout_records` (classes the model did
    not train on: the fairer test, since a model knows its training classes
    well enough that whitening can only lose there). `check_gain` refuses a
    whitening that makes the held-out result worse."""
    if kind not in KINDS:
        raise UserError(f"--kind={kind!r} is unknown; use supervised or pca.")
    if not 0.0 <= holdout_fraction < 1.0:
        raise UserError(f"--holdout_fraction must be in [0, 1), got {holdout_fraction}.")
    if holdout_records:
        from dplg_tf.data.pipeline import shard_files

        shard_files(holdout_records)   # a bad pattern fails before any image is described
    x, labels = describe_records(describer, pattern, max_images, progress=progress)
    full = x.shape[1]
    if not 0 < (dim or full) <= full:   # the message of _check, without its float64 copy
        raise UserError(f"The whitened dimension must lie in 1..{full}, got {dim}.")
    dims = [dim] if dim else sorted({d for d in (full // 2, full // 4) if d >= 8} | {full},
                                    reverse=True)
    shrinkages = [shrinkage] if shrinkage is not None else list(SHRINKAGES)
    held = None
    if holdout_fraction or holdout_records:
        other = None
        if holdout_records:
            other = describe_records(describer, holdout_records, max_images, progress=progress)
        raw, rows = held_out_table(x, labels, kind, dims, shrinkages, holdout_fraction, seed,
                                   other)
        best_dim, best_shrinkage, best = rows[0]
        held = {"fraction": None if holdout_records else holdout_fraction,
                "records": holdout_records, "raw_map": round(raw, 2),
                "whitened_map": round(best, 2),
                "table": [{"dim": d, "shrinkage": s, "map": round(m, 2)} for d, s, m in rows]}
    else:
        best_dim = dims[0]
        best_shrinkage = DEFAULT_SHRINKAGE if shrinkage is None else shrinkage
    mean, projection = _fit(x, labels, kind, best_dim, best_shrinkage)
    metadata = {"kind": kind, "input_dim": int(full), "output_dim": int(best_dim),
                "images": len(x), "classes": int(len(np.unique(labels))),
                "records": pattern, "model": describer.identity,
                "probe": [float(v) for v in describer.probe()],
                "scales": "the export's serving_default scales", "held_out": held}
    if kind == "pca":
        metadata["shrinkage"] = best_shrinkage
    return mean, projection, metadata


class WhiteningHurts(UserError):
    """The whitening makes the held-out classes' mAP worse."""


def check_gain(metadata, force=False):
    """A WhiteningHurts unless the chosen whitening is at least as good as the
    raw descriptor on the held-out classes (or `force`)."""
    held = metadata.get("held_out")
    if held is None or force or held["whitened_map"] >= held["raw_map"]:
        return
    where = ("" if held.get("records") else ", and they are classes of --records, which "
             "the model may have trained on (whitening can only lose on those): measure on "
             "classes it never saw with --holdout_records")
    raise WhiteningHurts(
        f"The best whitening makes the held-out classes worse (mAP {held['whitened_map']:.2f} "
        f"whitened against {held['raw_map']:.2f} raw), so no file was written{where}; or "
        "learn it on more images per class, or pass --force to write it anyway.")

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

from dplg_tf.errors import InputNotFound, UserError

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
    """(i, j) index arrays of images of the same class, i < j (sampled if many)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        i, j = np.triu_indices(len(members), 1)
        first.append(members[i])
        second.append(members[j])
    if not first:
        raise UserError("Supervised whitening needs at least one class with two images.")
    first, second = np.concatenate(first), np.concatenate(second)
    if len(first) > max_pairs:
        keep = rng.choice(len(first), max_pairs, replace=False)
        first, second = first[keep], second[keep]
    return first, second


def learn_supervised(x, labels, dim, ridge=1e-6):
    """(mean [D], projection [dim, D]) of Lw from class labels."""
    x = _check(x, dim)
    i, j = matching_pairs(labels)
    mean = x.mean(axis=0)
    diff = x[i] - x[j]
    within = diff.T @ diff / len(diff)
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


def read_records(pattern, max_images=0):
    """(encoded images [bytes], labels [int]) of the records matching `pattern`."""
    import tensorflow as tf

    from dplg_tf.data.pipeline import FEATURES

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise InputNotFound(f"No TFRecord shards match {pattern!r}.")
    blobs, labels = [], []
    ds = tf.data.TFRecordDataset(files).map(
        lambda r: tf.io.parse_single_example(r, FEATURES))
    if max_images:
        ds = ds.take(max_images)
    for example in ds:
        blobs.append(example["image/encoded"].numpy())
        labels.append(int(example["image/class/label"]))
    if not blobs:
        raise UserError(f"The shards {pattern!r} hold no records.")
    return blobs, np.asarray(labels)


def describe_records(describer, blobs, batch_size=16, progress=True):
    from dplg_tf.console import progress_bar

    bar = progress_bar(len(blobs), "images", enabled=progress)
    rows = []
    for start in range(0, len(blobs), batch_size):
        rows.append(describer.describe_bytes(blobs[start:start + batch_size]))
        bar.update(min(batch_size, len(blobs) - start))
    bar.close()
    return np.concatenate(rows).astype(np.float32)


def learn(describer, pattern, kind, dim, max_images=0, shrinkage=0.1, progress=True):
    """(mean, projection, metadata) learned on the records of `pattern`."""
    if kind not in KINDS:
        raise UserError(f"--kind={kind!r} is unknown; use supervised or pca.")
    blobs, labels = read_records(pattern, max_images)
    x = describe_records(describer, blobs, progress=progress)
    dim = dim or x.shape[1]
    if kind == "supervised":
        mean, projection = learn_supervised(x, labels, dim)
    else:
        mean, projection = learn_pca(x, dim, shrinkage)
    metadata = {"kind": kind, "input_dim": int(x.shape[1]), "output_dim": int(dim),
                "images": len(x), "classes": int(len(np.unique(labels))),
                "records": pattern, "model": describer.identity,
                "probe": [float(v) for v in describer.probe()],
                "scales": "the export's serving_default scales"}
    if kind == "pca":
        metadata["shrinkage"] = shrinkage
    return mean, projection, metadata

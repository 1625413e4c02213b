"""Learned whitening of global descriptors, and its file.

Two kinds, both a mean m and a projection P (out_dim x D) applied as
normalise(P (x - m)):

- `supervised` (Radenovic et al.'s Lw, ECCV 2016 / TPAMI 2019): whiten by
  the covariance of the differences of matching pairs (images of the same
  class), then rotate onto the principal directions of the whitened data.
  Directions along which views of one landmark differ are shrunk.
- `pca`: PCA-whitening of the covariance, with shrinkage: each principal
  direction is divided by sqrt(eigenvalue + shrinkage * mean eigenvalue), so
  that the many small-variance directions are not blown up.

`save(path, ...)` / `load(path)` keep the mean, the projection and metadata
(kind, dimensions, the model's probe) in one .npz, written atomically.
"""

import io
import json

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


def save(path, mean, projection, **metadata):
    from dplg_tf.storage.atomic import write_atomic

    buf = io.BytesIO()
    np.savez(buf, mean=np.asarray(mean, np.float32),
             projection=np.asarray(projection, np.float32),
             metadata=np.array(json.dumps(metadata)))
    write_atomic(path, buf.getvalue())


def load(path):
    """(mean [D], projection [d, D], metadata dict), checked."""
    from dplg_tf.errors import InputNotFound

    try:
        with np.load(path, allow_pickle=False) as data:
            mean, projection = data["mean"], data["projection"]
            metadata = json.loads(str(data["metadata"]))
    except FileNotFoundError:
        raise InputNotFound(f"{path} does not exist; make it with dplg-whiten.") from None
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{path} is not a whitening file of dplg-whiten ({e}).") from None
    if (mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0]
            or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(projection)))):
        raise UserError(f"{path} holds a mean {mean.shape} and a projection "
                        f"{projection.shape} that do not fit together; make it again.")
    return mean.astype(np.float32), projection.astype(np.float32), metadata

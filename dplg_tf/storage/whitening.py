"""Whitening files (dplg-whiten writes them, dplg-export reads them): one .npz
with `mean` [D], `projection` [d, D] and `metadata` (JSON: kind, dimensions,
the model's probe descriptor), written atomically and checked when read."""

import io
import json

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.storage.atomic import write_atomic
from dplg_tf.storage.npz import read_arrays


def save(path, mean, projection, **metadata):
    buf = io.BytesIO()
    np.savez(buf, mean=np.asarray(mean, np.float32),
             projection=np.asarray(projection, np.float32),
             metadata=np.array(json.dumps(metadata)))
    write_atomic(path, buf.getvalue())


def load(path):
    """(mean [D], projection [d, D], metadata dict), checked: float arrays that
    fit together, finite, a projection with no zero row, metadata an object."""
    remedy = "make it again with dplg-whiten"
    data = read_arrays(path, {"mean": "f", "projection": "f", "metadata": "U"},
                       "whitening file", remedy)
    missing = [k for k in ("mean", "projection", "metadata") if k not in data]
    if missing:
        raise UserError(f"{path} is not a whitening file of dplg-whiten (no {missing}); "
                        f"{remedy}.")
    mean, projection = data["mean"], data["projection"]
    try:
        metadata = json.loads(str(data["metadata"]))
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: its metadata is not a JSON object; {remedy}.")
    if (mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0]
            or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(projection)))):
        raise UserError(f"{path} holds a mean {mean.shape} and a projection "
                        f"{projection.shape} that do not fit together; {remedy}.")
    if not projection.size or np.any(np.abs(projection).sum(axis=1) == 0):
        raise UserError(f"{path}: its projection has rows of zeros (it would serve zero "
                        f"descriptors); {remedy}.")
    return mean.astype(np.float32), projection.astype(np.float32), metadata

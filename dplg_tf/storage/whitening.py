"""Whitening files (dplg-whiten writes them, dplg-export reads them): one .npz
with `mean` [D], `projection` [d, D] and `metadata` (JSON: kind, dimensions,
the model's probe descriptor), written atomically and checked when read."""

import io
import json

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage.atomic import write_atomic


def save(path, mean, projection, **metadata):
    buf = io.BytesIO()
    np.savez(buf, mean=np.asarray(mean, np.float32),
             projection=np.asarray(projection, np.float32),
             metadata=np.array(json.dumps(metadata)))
    write_atomic(path, buf.getvalue())


def load(path):
    """(mean [D], projection [d, D], metadata dict), checked."""
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

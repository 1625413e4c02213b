"""Descriptor files (.npz).

A descriptor file holds `names` [N], `descriptors` float32 [N, D], the
model's `probe` descriptor [D] (its descriptor of dplg_tf.images' probe
image, which identifies the model), and `error_names` / `error_reasons`
for the images that could not be described. It is written atomically.
`same_probe` is the one test of "the same model" for every file we read.
"""

import io
import os

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage.atomic import write_atomic
from dplg_tf.storage.npz import read_arrays

PROBE_TOLERANCE = 1e-3


def write_npz(path, names, descriptors, probe=None, errors=()):
    """Write a descriptor file atomically, under exactly `path`."""
    buf = io.BytesIO()
    arrays = {"names": np.array([str(n) for n in names], dtype=str),
              "descriptors": np.asarray(descriptors, np.float32),
              "error_names": np.array([str(n) for n, _ in errors], dtype=str),
              "error_reasons": np.array([str(r) for _, r in errors], dtype=str)}
    if probe is not None:
        arrays["probe"] = np.asarray(probe, np.float32).ravel()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def read_npz(path):
    """(descriptors [N, D] float32, names, probe or None) of a descriptor file,
    checked: a 2-D finite array and one name per row."""
    return read_npz_with_errors(path)[:3]


def read_npz_with_errors(path):
    """read_npz's (descriptors, names, probe) and the file's [(name, reason)]
    of the images that could not be described ([] when it records none)."""
    if not os.path.isfile(path):
        raise InputNotFound(f"Descriptor file {path} does not exist.")
    data = read_arrays(path, {"descriptors": "fiu", "names": "U", "probe": "fiu",
                              "error_names": "U", "error_reasons": "U"},
                       "descriptor file", "describe the images again")
    descriptors, names, probe = (data.get(k) for k in ("descriptors", "names", "probe"))
    if descriptors is None:
        raise UserError(f"{path} has no 'descriptors' array; describe the images again.")
    if names is not None and names.ndim != 1:
        raise UserError(f"{path}: 'names' must be a list of names; describe the images again.")
    if descriptors.ndim != 2 or descriptors.dtype.kind not in "fiu" or (
            descriptors.size and descriptors.shape[1] == 0):
        raise UserError(f"{path}: 'descriptors' must be a 2-D array of numbers [N, D], "
                         f"got shape {list(descriptors.shape)} of {descriptors.dtype}.")
    descriptors = descriptors.astype(np.float32, copy=False)
    if not np.all(np.isfinite(descriptors)):
        bad = int(np.sum(~np.all(np.isfinite(descriptors), axis=1)))
        raise UserError(f"{path}: {bad} descriptors hold NaN or infinite values.")
    names = [str(n) for n in names] if names is not None else [
        str(i) for i in range(len(descriptors))]
    if len(names) != len(descriptors):
        raise UserError(f"{path} has {len(descriptors)} descriptors but {len(names)} names.")
    if probe is not None:
        probe = probe.astype(np.float32).ravel()
        if probe.shape[0] != descriptors.shape[1] or not np.all(np.isfinite(probe)):
            raise UserError(f"{path}: the probe descriptor does not fit the descriptors.")
    failed, reasons = (data.get(k, np.zeros(0, str)) for k in ("error_names", "error_reasons"))
    if failed.ndim != 1 or reasons.ndim != 1 or len(failed) != len(reasons):
        raise UserError(f"{path}: 'error_names' and 'error_reasons' must be lists of the "
                        "same length; describe the images again.")
    return descriptors, names, probe, list(zip(map(str, failed), map(str, reasons)))


def same_probe(a, b):
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    return a.shape == b.shape and float(np.max(np.abs(a - b))) <= PROBE_TOLERANCE

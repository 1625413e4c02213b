"""Descriptor files (.npz) and the resumable, chunked writing of them.

A descriptor file holds `names` [N], `descriptors` float32 [N, D], the
model's `probe` descriptor [D] (its descriptor of dplg_tf.images' probe
image, which identifies the model), and `error_names` / `error_reasons`
for the images that could not be described. It is written atomically.

`ChunkedOutput` keeps a long run's work in `<output>.parts/`: a manifest
(the input listing's hash, the chunk size, the probe) and one file per
finished chunk, each written atomically. A rerun with the same inputs skips
finished chunks; the final file is assembled at the end and the parts are
removed.
"""

import hashlib
import io
import json
import os
import shutil

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage.atomic import write_atomic

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
    if not os.path.isfile(path):
        raise InputNotFound(f"Descriptor file {path} does not exist.")
    try:
        data = np.load(path, allow_pickle=False)
        files = data.files
        descriptors = data["descriptors"] if "descriptors" in files else None
        names = data["names"] if "names" in files else None
        probe = data["probe"] if "probe" in files else None
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise UserError(f"{path} is not a readable .npz descriptor file "
                         f"({type(e).__name__}).") from None
    if descriptors is None:
        raise UserError(f"{path} has no 'descriptors' array (found {files}).")
    if descriptors.ndim != 2 or descriptors.dtype.kind not in "fiu" or (
            descriptors.size and descriptors.shape[1] == 0):
        raise UserError(f"{path}: 'descriptors' must be a 2-D array of numbers [N, D], "
                         f"got shape {list(descriptors.shape)} of {descriptors.dtype}.")
    descriptors = descriptors.astype(np.float32)
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
    return descriptors, names, probe


def same_probe(a, b):
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    return a.shape == b.shape and float(np.max(np.abs(a - b))) <= PROBE_TOLERANCE


class ChunkedOutput:
    """The finished chunks of one run towards a descriptor file at `output`."""

    def __init__(self, output, names, chunk_size, probe):
        self.output, self.names, self.chunk_size = output, list(names), int(chunk_size)
        self.probe = np.asarray(probe, np.float32).ravel()
        self.folder = output + ".parts"
        digest = hashlib.sha256("\n".join(self.names).encode("utf-8", "surrogateescape"))
        self.manifest = {"inputs": len(self.names), "listing_sha256": digest.hexdigest(),
                         "chunk_size": self.chunk_size, "probe": self.probe.tolist()}
        self._open()

    def _open(self):
        path = os.path.join(self.folder, "manifest.json")
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
            if not same_probe(old.get("probe", []), self.probe):
                raise UserError(f"{self.folder} holds the unfinished work of another model; "
                                 "use that model, or delete the folder to start again.")
            if {k: v for k, v in old.items() if k != "probe"} != {
                    k: v for k, v in self.manifest.items() if k != "probe"}:
                raise UserError(f"{self.folder} holds the unfinished work of other inputs "
                                 "or another --chunk_size; delete it to start again.")
        else:
            os.makedirs(self.folder, exist_ok=True)
            write_atomic(path, json.dumps(self.manifest))

    def chunks(self):
        """[(index, names)] of every chunk."""
        return [(i, self.names[start:start + self.chunk_size])
                for i, start in enumerate(range(0, len(self.names), self.chunk_size))]

    def _path(self, i):
        return os.path.join(self.folder, f"chunk-{i:06d}.npz")

    def done(self, i):
        return os.path.isfile(self._path(i))

    def save(self, i, names, descriptors, errors):
        write_npz(self._path(i), names, descriptors, self.probe, errors)

    def finish(self):
        """Assemble the output from every chunk, remove the parts; returns
        (count, dimension, errors)."""
        names, rows, errors = [], [], []
        for i, _ in self.chunks():
            with np.load(self._path(i), allow_pickle=False) as data:
                names += [str(n) for n in data["names"]]
                if len(data["descriptors"]):
                    rows.append(data["descriptors"])
                errors += list(zip(data["error_names"].tolist(),
                                   data["error_reasons"].tolist()))
        dim = rows[0].shape[1] if rows else self.probe.shape[0]
        descriptors = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
        write_npz(self.output, names, descriptors, self.probe, errors)
        shutil.rmtree(self.folder, ignore_errors=True)
        return len(names), dim, errors

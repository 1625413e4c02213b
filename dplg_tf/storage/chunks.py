"""The one resumable chunk writer: a long run's finished work kept chunk by chunk.

`ChunkedOutput(output, names, chunk_size, probe)` keeps the work towards the
descriptor file `output` in `<output>.parts/`: a manifest (the input
listing's hash, the chunk size, the model's probe) and one descriptor file
per finished chunk, each written atomically. A rerun with the same inputs
and model skips the finished chunks; another model or other inputs are
refused. `finish()` assembles `output` and removes the parts. dplg-client
and the evaluation's cache write through it.
"""

import hashlib
import json
import os
import shutil

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.storage.atomic import write_atomic
from dplg_tf.storage.descriptors import same_probe, write_npz


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

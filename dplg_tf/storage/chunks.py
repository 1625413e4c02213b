"""The one resumable chunk writer: a long run's finished work kept part by part.

`ChunkedOutput(output, names, chunk_size, probe)` keeps the work towards the
descriptor file `output` in `<output>.parts/`: a manifest (the input
listing's hash and count, the model's probe) and one descriptor file per
finished part, `part-<start>-<end>.npz` for names[start:end], each written
atomically. The caller describes consecutive runs of names (`batches`) and
hands each over (`add`); a part is committed when it holds `chunk_size`
names or when `max_seconds` have passed since the last commit, so a kill
loses at most about a minute of work, whatever the chunk size.

A rerun with the same inputs and model skips the names of finished parts;
another model or other inputs are refused. Each part is checked when it is
read back (its model's probe, its names against the listing, finite
descriptors of one dimension): a damaged one is set aside and its names
are described again. `finish()` assembles `output` and removes the parts.
dplg-client and the evaluation's cache write through it.
"""

import hashlib
import json
import os
import re
import shutil
import time

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.storage.atomic import set_aside, write_atomic
from dplg_tf.storage.descriptors import read_npz_with_errors, same_probe, write_npz

FORMAT = 2   # parts named by their ranges (format 1 had fixed-size chunk-N files)
_PART = re.compile(r"^part-(\d{9})-(\d{9})\.npz$")


class ChunkedOutput:
    """The finished parts of one run towards a descriptor file at `output`."""

    def __init__(self, output, names, chunk_size, probe, max_seconds=60.0):
        self.output, self.names = output, list(names)
        self.chunk_size, self.max_seconds = max(1, int(chunk_size)), float(max_seconds)
        self.probe = np.asarray(probe, np.float32).ravel()
        self.folder = output + ".parts"
        digest = hashlib.sha256("\n".join(self.names).encode("utf-8", "surrogateescape"))
        self.manifest = {"format": FORMAT, "inputs": len(self.names),
                         "listing_sha256": digest.hexdigest(), "probe": self.probe.tolist()}
        self.damaged = []            # parts set aside on reading, with the reason
        self._buffer, self._last_commit = [], time.monotonic()
        self._open()
        self.parts = self._finished_parts()
        self.done = np.zeros(len(self.names), bool)
        for start, end in self.parts:
            self.done[start:end] = True

    def _open(self):
        path = os.path.join(self.folder, "manifest.json")
        if not os.path.isfile(path):
            os.makedirs(self.folder, exist_ok=True)
            write_atomic(path, json.dumps(self.manifest))
            return
        try:
            with open(path) as f:
                old = json.load(f)
            if not isinstance(old, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is damaged ({type(e).__name__}); delete {self.folder} "
                            "to start again.") from None
        if old.get("format") != FORMAT:
            raise UserError(f"{self.folder} was written by an older dplg_tf; delete it to "
                            "start again.")
        if not same_probe(old.get("probe", []), self.probe):
            raise UserError(f"{self.folder} holds the unfinished work of another model; "
                            "use that model, or delete the folder to start again.")
        if {k: v for k, v in old.items() if k != "probe"} != {
                k: v for k, v in self.manifest.items() if k != "probe"}:
            raise UserError(f"{self.folder} holds the unfinished work of other inputs; "
                            "delete it to start again.")

    def _finished_parts(self):
        """[(start, end)] of the parts that read back correctly, in order; the
        others are renamed *.damaged and their names described again."""
        parts, covered = [], np.zeros(len(self.names), bool)
        for name in sorted(os.listdir(self.folder)):
            match = _PART.match(name)
            if not match:
                continue
            start, end = int(match.group(1)), int(match.group(2))
            problem = self._check_part(name, start, end, covered)
            if problem:
                self.damaged.append((name, problem))
                set_aside(os.path.join(self.folder, name))
                continue
            covered[start:end] = True
            parts.append((start, end))
        return parts

    def _check_part(self, name, start, end, covered):
        """Why the part `name` cannot be used, or None."""
        if not 0 <= start < end <= len(self.names) or covered[start:end].any():
            return "its range does not fit the inputs"
        try:
            rows, ok, probe, errors = read_npz_with_errors(os.path.join(self.folder, name))
        except (UserError, ValueError, OSError) as e:
            return f"unreadable ({e})"
        if probe is None or not same_probe(probe, self.probe):
            return "written by another model"
        if len(rows) and rows.shape[1] != len(self.probe):
            return "descriptors of another dimension"
        if sorted(ok + [n for n, _ in errors]) != sorted(self.names[start:end]):
            return "its names are not those of its range"
        return None

    def batches(self, size):
        """[(start, end)] runs of at most `size` names still to describe, in order."""
        out, i, n = [], 0, len(self.names)
        while i < n:
            if self.done[i]:
                i += 1
                continue
            j = i
            while j < n and j - i < size and not self.done[j]:
                j += 1
            out.append((i, j))
            i = j
        return out

    def add(self, start, end, names, descriptors, errors):
        """The results of names[start:end]: described `names` with their
        `descriptors`, and [(name, reason)] `errors`; committed when the part
        is full or a minute has passed."""
        if self._buffer and self._buffer[-1][1] != start:
            self.flush()   # not contiguous: a finished part lies between
        self._buffer.append((start, end, list(names), np.asarray(descriptors, np.float32),
                             list(errors)))
        size = self._buffer[-1][1] - self._buffer[0][0]
        if size >= self.chunk_size or time.monotonic() - self._last_commit >= self.max_seconds:
            self.flush()

    def flush(self):
        """Commit what has been added since the last commit as one part."""
        if self._buffer:
            start, end = self._buffer[0][0], self._buffer[-1][1]
            names = [n for b in self._buffer for n in b[2]]
            rows = [b[3] for b in self._buffer if len(b[3])]
            rows = np.concatenate(rows) if rows else np.zeros((0, len(self.probe)), np.float32)
            errors = [e for b in self._buffer for e in b[4]]
            write_npz(os.path.join(self.folder, f"part-{start:09d}-{end:09d}.npz"), names,
                      rows, self.probe, errors)
            self.parts.append((start, end))
            self.done[start:end] = True
            self._buffer = []
        self._last_commit = time.monotonic()

    def finish(self):
        """Assemble the output from every part, remove the parts; returns
        (count, dimension, errors)."""
        self.flush()
        if not self.done.all():
            raise UserError(f"{self.folder} still misses {int((~self.done).sum())} images; "
                            "rerun the same command to finish it.")
        names, rows, errors = [], [], []
        for start, end in sorted(self.parts):
            path = os.path.join(self.folder, f"part-{start:09d}-{end:09d}.npz")
            part_rows, part_names, _, part_errors = read_npz_with_errors(path)
            errors += part_errors
            names += part_names
            if len(part_rows):
                rows.append(part_rows)
        dim = rows[0].shape[1] if rows else self.probe.shape[0]
        descriptors = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
        write_npz(self.output, names, descriptors, self.probe, errors)
        shutil.rmtree(self.folder, ignore_errors=True)
        return len(names), dim, errors

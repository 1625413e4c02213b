"""The one opener of descriptor sources: what dplg-index, dplg-search and the
evaluation's distractors take in.

`open_descriptors(path)` reads a dplg-extract output folder, an index
folder (the descriptors it holds, storage.index_files), a descriptor file
(.npz, storage.descriptors) or a bare .npy array, told apart by what they
are on disk (an index's meta.json or CURRENT, a folder, a .npy file's magic
bytes, else a .npz), and
returns a `Descriptors`: the rows, names, the model's probe descriptor and,
for a folder, its manifest. A source without a probe (an .npy, an .npz
written without one) cannot be checked against a model: it is refused
unless `allow_unverified`.
"""

import dataclasses
import os

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage import extraction, index_files
from dplg_tf.storage.descriptors import read_npz_with_errors

NPY_MAGIC = b"\x93NUMPY"


@dataclasses.dataclass
class Descriptors:
    """A descriptor source: `rows` float32 [N, D] and `names` (None for a
    folder opened with rows=False), `probe` float32 [D] or None, `kind`
    ("folder", "index", "npz" or "npy"), a folder's `manifest`, an .npz's `errors`
    [(name, reason)]."""

    path: str
    kind: str
    rows: np.ndarray | None
    names: list | None
    probe: np.ndarray | None
    manifest: dict | None = None
    errors: list = dataclasses.field(default_factory=list)

    @property
    def scales(self):
        """The scales a folder's images were described at (None if unknown)."""
        return (self.manifest or {}).get("scales")

    def read_rows(self, dim=None):
        """The rows, a folder's read now if it was opened with rows=False;
        `dim` is checked first for a folder (read_all refuses another one)."""
        if self.rows is None:
            self.rows, self.names, _ = extraction.read_all(self.path, dim)
        return self.rows


def refuse_unverified(path):
    raise UserError(f"{path} carries no probe descriptor, so the model that made it cannot "
                    "be checked; describe the images with dplg-extract or dplg-client, or "
                    "pass --allow_unverified.")


def open_descriptors(path, allow_unverified=False, rows=True):
    """The descriptor source at `path`, checked; with rows=False a folder's
    shards are only checked, not read (stream them with
    extraction.iter_descriptors, or call read_rows)."""
    if index_files.is_index_folder(path):
        array, names, probe = index_files.stored_vectors(path)
        if probe is None and not allow_unverified:
            refuse_unverified(path)
        return Descriptors(path, "index", array, names, probe)
    if os.path.isdir(path):
        manifest = extraction.check_complete(path)
        probe = np.asarray(manifest["probe"], np.float32)
        source = Descriptors(path, "folder", None, None, probe, manifest)
        if rows:
            source.read_rows()
        return source
    if not os.path.isfile(path):
        raise InputNotFound(f"Descriptor file {path} does not exist.")
    if _is_npy(path):
        if not allow_unverified:
            refuse_unverified(path)
        array = read_npy(path)
        return Descriptors(path, "npy", array, [str(i) for i in range(len(array))], None)
    array, names, probe, errors = read_npz_with_errors(path)
    if probe is None and not allow_unverified:
        refuse_unverified(path)
    return Descriptors(path, "npz", array, names, probe, errors=errors)


def _is_npy(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError:
        return False


def read_npy(path):
    """A bare .npy array of descriptors: 2-D, finite floats, as float32. The
    file is mapped, not read, until it has been checked (no object arrays;
    a header that declares more than the file holds is refused)."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError, OverflowError) as e:
        raise UserError(f"{path} is not a readable .npy array ({type(e).__name__}); "
                        "give a dplg-extract folder or a dplg-client .npz.") from None
    if mapped.ndim != 2 or mapped.dtype.kind != "f" or (mapped.size and mapped.shape[1] == 0):
        raise UserError(f"{path} holds shape {list(mapped.shape)} of {mapped.dtype}; expected "
                        "finite float descriptors [N, D].")
    array = np.array(mapped, np.float32)
    del mapped
    if not np.all(np.isfinite(array)):
        raise UserError(f"{path} holds NaN or infinite values; expected finite float "
                        "descriptors [N, D].")
    return array

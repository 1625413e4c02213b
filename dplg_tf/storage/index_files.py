"""Index folders on disk, as search.index.DescriptorIndex writes them: the one
reader of their files.

A folder holds committed states (storage.atomic.StateFolder; an older
index is one flat state). A state holds `index.faiss`, `names.json` (the
id -> name mapping) and `meta.json` (dimension, kind, parameters, the
model's probe descriptor, the image root, the other files' checksums).
`read_state` checks every part before it is used and refuses a damaged or
changed one with one sentence (IndexMismatch); `stored_vectors` gives the
descriptors an index holds, so that an index folder is a descriptor source.
"""

import hashlib
import json
import os

import numpy as np

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage.atomic import StateFolder


class IndexMismatch(UserError):
    """The index and the request do not fit together."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_kind(value):
    """How a JSON value is called in an error sentence."""
    if isinstance(value, list):
        return "a list" if all(isinstance(v, str) for v in value) else "a list of non-strings"
    return {dict: "an object", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), "null")


# meta.json's fields and the JSON types each may hold (None: null)
META_FIELDS = {"dim": (int,), "kind": (str,), "params": (dict,), "probe": (list, type(None)),
               "image_root": (str, type(None)), "sha256": (dict, type(None))}


def _check_meta(meta, state):
    """Refuse a meta.json of the wrong shape with one sentence (IndexMismatch)."""
    if not isinstance(meta, dict):
        raise IndexMismatch(f"{state}/meta.json must be a JSON object, not "
                            f"{_json_kind(meta)}; rebuild the index with dplg-index.")
    for field, types in META_FIELDS.items():
        value = meta.get(field)
        if (field in ("dim", "kind", "params") and field not in meta) or not isinstance(
                value, types) or isinstance(value, bool):
            raise IndexMismatch(f"{state}/meta.json has a bad {field!r} ("
                                f"{_json_kind(value)}); rebuild the index with dplg-index.")
    if meta["dim"] < 1 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  for v in meta["probe"] or ()):
        raise IndexMismatch(f"{state}/meta.json has a bad dimension or probe; rebuild the "
                            "index with dplg-index.")


def is_index_folder(folder):
    return os.path.isdir(folder) and (
        os.path.isfile(os.path.join(folder, StateFolder.POINTER))
        or os.path.isfile(os.path.join(folder, "meta.json")))


def state_folder(folder):
    """The committed state of the index folder `folder` (itself when flat)."""
    if not os.path.isdir(folder):
        what = "a file" if os.path.exists(folder) else "missing"
        raise InputNotFound(f"--index_dir {folder} is {what}, not an index folder; "
                            "build one with dplg-index.")
    state = StateFolder(folder).current() or folder
    if not os.path.isfile(os.path.join(state, "meta.json")):
        raise InputNotFound(f"{folder} is not an index folder (no committed "
                            "index); build one with dplg-index.")
    return state


def read_state(state, folder=None):
    """(meta, the FAISS index, names) of a state folder, checked; `folder`
    names the index in the sentence of a damaged one."""
    try:
        return _read_state(state)
    except IndexMismatch:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError,
            IndexError) as e:
        raise IndexMismatch(f"The index in {folder or state} is damaged ({type(e).__name__}); "
                            "rebuild it with dplg-index.") from None


def _read_state(state):
    import faiss

    with open(os.path.join(state, "meta.json")) as f:
        meta = json.load(f)
    _check_meta(meta, state)
    for name, digest in (meta.get("sha256") or {}).items():   # indexes since the checksums
        if name not in ("index.faiss", "names.json") or sha256(
                os.path.join(state, name)) != digest:
            raise IndexMismatch(f"{state}/{name} was changed after dplg-index wrote it "
                                "(its checksum differs); rebuild the index.")
    index = faiss.read_index(os.path.join(state, "index.faiss"))
    with open(os.path.join(state, "names.json")) as f:
        names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise IndexMismatch(f"{state}/names.json must be a JSON list of image names "
                            f"(strings), not {_json_kind(names)}; rebuild the "
                            "index with dplg-index.")
    if meta["kind"] in ("exact", "hnsw"):   # stored as floats: a damaged one shows NaN
        flat = _flat(index, meta["kind"])
        n, dim = flat.ntotal, meta["dim"]
        stored = faiss.rev_swig_ptr(flat.get_xb(), n * dim) if n else np.zeros(0)
        for start in range(0, n * dim, 1 << 24):
            if not np.all(np.isfinite(stored[start:start + (1 << 24)])):
                raise IndexMismatch(f"{state} holds NaN or infinite vectors; rebuild "
                                    "the index with dplg-index.")
    if index.ntotal != len(names) or index.d != meta["dim"]:
        raise IndexMismatch(f"{state} is inconsistent: {index.ntotal} vectors, "
                            f"{len(names)} names; rebuild it.")
    return meta, index, names


def _flat(index, kind):
    import faiss

    return index if kind == "exact" else faiss.downcast_index(index.storage)


def stored_vectors(folder):
    """(rows float32 [N, D], names, probe or None) of an index folder: the
    descriptors it holds (every kind keeps them whole: exact and hnsw as
    their vectors, pq and ivfpq in their exact re-ranking stage). An index
    built with DBA holds augmented vectors, not descriptors: refused."""
    meta, index, names = read_state(state_folder(folder), folder)
    if meta["params"].get("dba_k"):
        raise UserError(f"{folder} was built with DBA (dba_k={meta['params']['dba_k']}), so "
                        "it holds augmented vectors, not descriptors; give the descriptors "
                        "it was built from.")
    n = index.ntotal
    rows = index.reconstruct_n(0, n) if n else np.zeros((0, meta["dim"]), np.float32)
    probe = None if meta["probe"] is None else np.asarray(meta["probe"], np.float32)
    return np.asarray(rows, np.float32).reshape(n, meta["dim"]), names, probe

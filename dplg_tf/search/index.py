"""A FAISS index of descriptors on disk, and the dplg-index command (dplg-search
is in dplg_tf.cli.search).

    dplg-index --index_dir=idx --images=photos/ --server=127.0.0.1:8500
    dplg-index --index_dir=idx --descriptors=desc.npz --kind=hnsw
    dplg-index --index_dir=idx --descriptors=more.npz --append
    dplg-index --index_dir=idx --descriptors=extracted/ --kind=ivfpq   # dplg-extract's

An index folder holds `index.faiss`, `names.json` (the id -> name mapping)
and `meta.json` (dimension, kind, the model's "probe": its descriptor of
a fixed generated image, and the image root the names are relative to),
read back and checked by storage.index_files. Searching with another model
(whose probe differs) or another dimension is refused with a clear error.

Kinds: `exact` (inner product, brute force with BLAS), `pq` (every vector
scanned as a 4-bit product-quantised code with SIMD, the best k x `refine`
re-ranked exactly: the fast approximate kind when descriptors have no cluster
structure to exploit), `hnsw` (graph, no training) and `ivfpq` (inverted lists
with 8-bit product quantisation, candidates re-ranked exactly: scans only
`nprobe` of `nlist` lists, which pays off on clustered real-world descriptors).
`pq` and `ivfpq` are trained on (up to 100,000 of) the first descriptors added.
"""

import json
import os
import shutil

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.storage.descriptors import same_probe
from dplg_tf.retrieval.expansion import augment_for_index, normalise
from dplg_tf.retrieval.query import Settings
from dplg_tf.storage import index_files
from dplg_tf.storage.atomic import StateFolder
from dplg_tf.storage.index_files import IndexMismatch

KINDS = ("exact", "pq", "hnsw", "ivfpq")
class DescriptorIndex:
    def __init__(self, dim, kind="exact", probe=None, hnsw_m=32, ef_search=128,
                 nlist=1024, pq_m=64, nprobe=32, refine=10, fs_m=None, dba_k=0,
                 dba_alpha=3.0):
        import faiss

        if kind not in KINDS:
            raise UserError(f"Unknown index kind {kind!r}; use one of {', '.join(KINDS)}.")
        self.dim, self.kind = int(dim), kind
        self.probe = None if probe is None else np.asarray(probe, np.float32).ravel()
        if fs_m is None:  # two dimensions per 4-bit sub-quantiser
            fs_m = self.dim // 2 if self.dim % 2 == 0 else self.dim
        if self.dim % fs_m:
            raise UserError(f"fs_m={fs_m} must divide the dimension {self.dim}.")
        Settings(dba_k=dba_k, dba_alpha=dba_alpha)   # checked as every query setting is
        # DBA (dplg_tf.retrieval.expansion) of every vector added, kept with the index
        self.params = dict(hnsw_m=hnsw_m, ef_search=ef_search, nlist=nlist, pq_m=pq_m,
                           nprobe=nprobe, refine=refine, fs_m=fs_m, dba_k=int(dba_k),
                           dba_alpha=float(dba_alpha))
        self.names = []
        self.image_root = None   # the folder the names are relative to (dplg_tf.search.names)
        if kind == "exact":
            self.index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
            self.index.hnsw.efConstruction = max(40, ef_search // 2)
        else:
            self.index = None  # built when the training data is seen

    def _build(self, sample):
        if self.kind == "pq":
            self._build_pq(sample)
        else:
            self._build_ivfpq(sample)

    def _build_pq(self, sample):
        import faiss

        # the factory owns every part, so nothing wrapped can be freed under us
        index = faiss.index_factory(self.dim, f"PQ{self.params['fs_m']}x4fs,RFlat",
                                    faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        index.k_factor = self.params["refine"]
        self.index = index

    def _build_ivfpq(self, sample):
        import faiss

        nlist = max(1, min(self.params["nlist"], len(sample) // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.params["pq_m"], 8,
                               faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        ivf.nprobe = min(self.params["nprobe"], nlist)
        refined = faiss.IndexRefineFlat(ivf)
        refined.k_factor = self.params["refine"]
        self._parts = (quantizer, ivf)  # keep the wrapped indexes alive
        self.params["nlist"] = nlist
        self.index = refined

    def add(self, descriptors, names):
        x = normalise(descriptors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise IndexMismatch(f"Descriptors of shape {x.shape} cannot go into a "
                              f"{self.dim}-d index; they come from another model.")
        if len(names) != len(x):
            raise UserError(f"{len(x)} descriptors but {len(names)} names.")
        if self.params["dba_k"]:
            x = augment_for_index(self, x, self.params["dba_k"], self.params["dba_alpha"])
        if self.index is None:
            if len(x) < 256:
                raise IndexMismatch(f"A {self.kind} index needs at least 256 descriptors "
                                  "to train on; use --kind=exact or hnsw for small sets.")
            rng = np.random.default_rng(0)
            sample = x[rng.choice(len(x), min(len(x), 100_000), replace=False)]
            self._build(sample)
        self.index.add(x)
        self.names += [str(n) for n in names]

    def vectors(self, ids):
        """The stored vectors of `ids` (any shape) -> ids.shape + (dim,)."""
        ids = np.asarray(ids, np.int64)
        flat = ids.ravel()
        if len(flat) == 0 or self.index is None:
            return np.zeros(ids.shape + (self.dim,), np.float32)
        rows = self.index.reconstruct_batch(flat)
        return rows.reshape(ids.shape + (self.dim,)).astype(np.float32)

    def tune(self, refine=None, nprobe=None, ef_search=None):
        """Change the search-time knobs (more = slower and closer to exact)."""
        import faiss

        if self.index is None:
            return
        knobs = {"refine": refine, "nprobe": nprobe, "ef_search": ef_search}
        for name, value in knobs.items():
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, not {value}.")
        if refine is not None and self.kind in ("pq", "ivfpq"):
            faiss.downcast_index(self.index).k_factor = refine
            self.params["refine"] = refine
        if nprobe is not None and self.kind == "ivfpq":
            ivf = faiss.downcast_index(faiss.downcast_index(self.index).base_index)
            ivf.nprobe = min(nprobe, ivf.nlist)
            self.params["nprobe"] = ivf.nprobe
        if ef_search is not None and self.kind == "hnsw":
            self.index.hnsw.efSearch = ef_search
            self.params["ef_search"] = ef_search

    def __len__(self):
        return len(self.names)

    def search(self, queries, k=10):
        """(scores [n, k], ids [n, k]) with ids -1 where fewer than k exist."""
        q = normalise(queries)
        if q.shape[1] != self.dim:
            raise IndexMismatch(f"Queries are {q.shape[1]}-d but the index holds {self.dim}-d "
                              "descriptors; use the model the index was built with.")
        if self.index is None:
            raise IndexMismatch("The index is empty.")
        k = min(k, max(1, len(self)))
        if self.kind == "exact":
            return self._exact_search(q, k)
        return self.index.search(q, k)

    def _exact_search(self, q, k):
        """Brute force (retrieval.knn) over FAISS' stored vectors, read in place:
        several times faster here than IndexFlatIP.search."""
        import faiss

        from dplg_tf.retrieval import knn

        n = self.index.ntotal
        db = faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)
        return knn.search(q, db, k, threads=min(4, os.cpu_count() or 1))

    def check_probe(self, probe):
        """Refuse a model whose probe descriptor differs from the index's."""
        if self.probe is None or probe is None:
            return
        if not same_probe(probe, self.probe):
            raise IndexMismatch("The index was built with another model (its descriptor of "
                              "the probe image differs); rebuild the index or use that model.")

    def save(self, folder):
        """Write the index as a new state of `folder`, committed as a whole
        (dplg_tf.storage.atomic.StateFolder): a kill at any moment leaves the previous
        state loadable."""
        import faiss

        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"--index_dir {folder} is a file, not a folder.")
        states = StateFolder(folder)
        tmp = states.new()
        try:
            faiss.write_index(self.index, os.path.join(tmp, "index.faiss"))
            with open(os.path.join(tmp, "names.json"), "w") as f:
                json.dump(self.names, f)
            meta = {"dim": self.dim, "kind": self.kind, "count": len(self),
                    "params": self.params,
                    "probe": None if self.probe is None else self.probe.tolist(),
                    "image_root": self.image_root,
                    "sha256": {n: index_files.sha256(os.path.join(tmp, n))
                               for n in ("index.faiss", "names.json")}}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
            states.commit(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def exists(folder):
        return index_files.is_index_folder(folder)

    @classmethod
    def load(cls, folder, state=None):
        """The committed index of `folder` (or of an older flat folder); `state`:
        the state folder to read (one StateFolder.current() gave) instead."""
        meta, faiss_index, names = index_files.read_state(
            state or index_files.state_folder(folder), folder)
        try:
            index = cls(meta["dim"], meta["kind"], meta["probe"], **meta["params"])
            if meta["kind"] == "hnsw":
                faiss_index.hnsw.efSearch = meta["params"]["ef_search"]
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise IndexMismatch(f"The index in {folder} is damaged ({type(e).__name__}); "
                                "rebuild it with dplg-index.") from None
        index.image_root = meta.get("image_root")
        index.index, index.names = faiss_index, names
        return index


# -------------------------------------------------------------------- CLI


def folder_chunks(folder, first=100_000):
    """(descriptors, names) of a dplg-extract folder, shard by shard; the first
    chunk gathers up to `first` rows (what a pq / ivfpq index trains on)."""
    from dplg_tf.storage import extraction

    rows, names = [], []
    stream = extraction.iter_descriptors(folder)
    for shard_names, shard_rows in stream:
        rows.append(shard_rows)
        names += shard_names
        if len(names) >= first:
            break
    if names:
        yield np.concatenate(rows), names
    yield from ((r, n) for n, r in stream if len(n))

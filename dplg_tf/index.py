"""A FAISS index of descriptors on disk, and the dplg-index / dplg-search commands.

    dplg-index --index_dir=idx --images=photos/ --server=127.0.0.1:8500
    dplg-index --index_dir=idx --descriptors=desc.npz --kind=hnsw
    dplg-index --index_dir=idx --descriptors=more.npz --append
    dplg-search --index_dir=idx --server=127.0.0.1:8500 query.jpg --top_k=10
    dplg-search --index_dir=idx --descriptors=queries.npz

An index folder holds `index.faiss`, `names.json` (the id -> name mapping)
and `meta.json` (dimension, kind, and the model's "probe": its descriptor of
a fixed generated image). Searching with another model (whose probe differs)
or another dimension is refused with a clear error.

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
import sys

import numpy as np

from dplg_tf import cli

KINDS = ("exact", "pq", "hnsw", "ivfpq")
PROBE_TOLERANCE = 1e-3


class IndexMismatch(ValueError):
    """The index and the request do not fit together."""


def probe_image():
    """A fixed generated image whose descriptor identifies a model."""
    from dplg_tf.data.synthetic import facade_image

    return facade_image(160, 224, seed=12345)


def probe_bytes():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(probe_image()).save(buf, "PNG")  # lossless: same pixels everywhere
    return buf.getvalue()


def _normalise(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class DescriptorIndex:
    def __init__(self, dim, kind="exact", probe=None, hnsw_m=32, ef_search=128,
                 nlist=1024, pq_m=64, nprobe=32, refine=10, fs_m=None):
        import faiss

        if kind not in KINDS:
            raise ValueError(f"Unknown index kind {kind!r}; use one of {', '.join(KINDS)}.")
        self.dim, self.kind = int(dim), kind
        self.probe = None if probe is None else np.asarray(probe, np.float32).ravel()
        if fs_m is None:  # two dimensions per 4-bit sub-quantiser
            fs_m = self.dim // 2 if self.dim % 2 == 0 else self.dim
        if self.dim % fs_m:
            raise ValueError(f"fs_m={fs_m} must divide the dimension {self.dim}.")
        self.params = dict(hnsw_m=hnsw_m, ef_search=ef_search, nlist=nlist, pq_m=pq_m,
                           nprobe=nprobe, refine=refine, fs_m=fs_m)
        self.names = []
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
        x = _normalise(descriptors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise IndexMismatch(f"Descriptors of shape {x.shape} cannot go into a "
                              f"{self.dim}-d index; they come from another model.")
        if len(names) != len(x):
            raise ValueError(f"{len(x)} descriptors but {len(names)} names.")
        if self.index is None:
            if len(x) < 256:
                raise IndexMismatch(f"A {self.kind} index needs at least 256 descriptors "
                                  "to train on; use --kind=exact or hnsw for small sets.")
            rng = np.random.default_rng(0)
            sample = x[rng.choice(len(x), min(len(x), 100_000), replace=False)]
            self._build(sample)
        self.index.add(x)
        self.names += [str(n) for n in names]

    def tune(self, refine=None, nprobe=None, ef_search=None):
        """Change the search-time knobs (more = slower and closer to exact)."""
        import faiss

        if self.index is None:
            return
        knobs = {"refine": refine, "nprobe": nprobe, "ef_search": ef_search}
        for name, value in knobs.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}.")
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
        q = _normalise(queries)
        if q.shape[1] != self.dim:
            raise IndexMismatch(f"Queries are {q.shape[1]}-d but the index holds {self.dim}-d "
                              "descriptors; use the model the index was built with.")
        if self.index is None:
            raise IndexMismatch("The index is empty.")
        k = min(k, max(1, len(self)))
        if self.kind == "exact":
            return self._exact_search(q, k)
        return self.index.search(q, k)

    def _exact_search(self, q, k, chunk=131072):
        """Brute force with BLAS over blocks of the stored vectors, top-k kept per
        block and merged: several times faster here than IndexFlatIP.search."""
        import concurrent.futures

        import faiss

        n = self.index.ntotal
        db = faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)

        def block(start):
            scores = q @ db[start:start + chunk].T
            kk = min(k, scores.shape[1])
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            return np.take_along_axis(scores, part, 1), part + start

        with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
            parts = list(pool.map(block, range(0, n, chunk)))
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def check_probe(self, probe):
        """Refuse a model whose probe descriptor differs from the index's."""
        if self.probe is None or probe is None:
            return
        probe = np.asarray(probe, np.float32).ravel()
        if probe.shape != self.probe.shape or float(np.max(np.abs(probe - self.probe))) > \
                PROBE_TOLERANCE:
            raise IndexMismatch("The index was built with another model (its descriptor of "
                              "the probe image differs); rebuild the index or use that model.")

    def save(self, folder):
        import faiss

        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, "index.faiss.tmp")
        faiss.write_index(self.index, tmp)
        os.replace(tmp, os.path.join(folder, "index.faiss"))
        with open(os.path.join(folder, "names.json"), "w") as f:
            json.dump(self.names, f)
        meta = {"dim": self.dim, "kind": self.kind, "count": len(self), "params": self.params,
                "probe": None if self.probe is None else self.probe.tolist()}
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f)

    @classmethod
    def load(cls, folder):
        import faiss

        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{folder} is not an index folder (no meta.json); "
                                    "build one with dplg-index.")
        with open(meta_path) as f:
            meta = json.load(f)
        index = cls(meta["dim"], meta["kind"], meta["probe"], **meta["params"])
        index.index = faiss.read_index(os.path.join(folder, "index.faiss"))
        if meta["kind"] == "hnsw":
            index.index.hnsw.efSearch = meta["params"]["ef_search"]
        with open(os.path.join(folder, "names.json")) as f:
            index.names = json.load(f)
        if index.index.ntotal != len(index.names):
            raise IndexMismatch(f"{folder} is inconsistent: {index.index.ntotal} vectors, "
                              f"{len(index.names)} names; rebuild it.")
        return index


# ------------------------------------------------------------ describing

class Describer:
    """Descriptors of image files and of the probe, through a server or a SavedModel."""

    def __init__(self, server=None, model=None, model_name="dplg"):
        if bool(server) == bool(model):
            raise ValueError("Give exactly one of --server (host:port) or --model (SavedModel).")
        if server:
            from dplg_tf.serving.client import Client

            self.client = Client(server, model_name, timeout=600)
            self.fn = None
        else:
            import tensorflow as tf

            from dplg_tf.export import resolve_saved_model

            path = resolve_saved_model(model)
            self.fn = tf.saved_model.load(path).signatures["serving_default"]
            self.client = None

    def describe_bytes(self, blobs):
        if self.client is not None:
            return self.client.describe_bytes(blobs)
        import tensorflow as tf

        return self.fn(image_bytes=tf.constant(blobs))["global_descriptor"].numpy()

    def describe_files(self, paths, batch_size=8, progress=None):
        if self.client is not None:
            return self.client.describe_files(paths, batch_size, 4, progress)
        rows = []
        for i in range(0, len(paths), batch_size):
            blobs = []
            for p in paths[i:i + batch_size]:
                with open(p, "rb") as f:
                    blobs.append(f.read())
            rows.append(self.describe_bytes(blobs))
            if progress is not None:
                progress.update(len(blobs))
        return np.concatenate(rows)

    def probe(self):
        return self.describe_bytes([probe_bytes()])[0]


def read_descriptor_file(path):
    """(descriptors, names, probe or None) from an .npz of dplg-client / dplg-index."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Descriptor file {path} does not exist.")
    data = np.load(path, allow_pickle=False)
    if "descriptors" not in data.files:
        raise ValueError(f"{path} has no 'descriptors' array (found {data.files}).")
    descriptors = data["descriptors"]
    names = [str(n) for n in data["names"]] if "names" in data.files else [
        str(i) for i in range(len(descriptors))]
    probe = data["probe"] if "probe" in data.files else None
    return descriptors, names, probe


# -------------------------------------------------------------------- CLI

def _define_common():
    from absl import flags

    flags.DEFINE_string("index_dir", None, "The index folder.", required=True)
    flags.DEFINE_string("server", None, "host:port of dplg-serve or TF Serving.")
    flags.DEFINE_string("model", None, "A SavedModel base path or version folder.")
    flags.DEFINE_string("model_name", "dplg", "Model name on the server.")
    flags.DEFINE_string("descriptors", None, "An .npz with descriptors (and names, probe).")


def index_main(argv):
    from absl import flags

    from dplg_tf.progress import Progress
    from dplg_tf.serving.client import list_images

    f = flags.FLAGS
    paths = list(f.images or []) + argv[1:]
    if bool(paths) == bool(f.descriptors):
        raise ValueError("Give either --descriptors or image files / folders (--images).")
    if f.descriptors:
        descriptors, names, probe = read_descriptor_file(f.descriptors)
    else:
        describer = Describer(f.server, f.model, f.model_name)
        names = list_images(paths)
        if not names:
            raise ValueError("No image files found in " + ", ".join(paths) + ".")
        bar = Progress(len(names), "images")
        descriptors = describer.describe_files(names, progress=bar)
        bar.close()
        probe = describer.probe()
    if f.append:
        index = DescriptorIndex.load(f.index_dir)
        index.check_probe(probe)
    else:
        if os.path.isfile(os.path.join(f.index_dir, "meta.json")) and not f.overwrite:
            raise ValueError(f"{f.index_dir} already holds an index; pass --append to add "
                             "to it or --overwrite to replace it.")
        index = DescriptorIndex(descriptors.shape[1], f.kind, probe)
    index.add(descriptors, names)
    index.save(f.index_dir)
    print(f"{f.index_dir}: {len(index)} descriptors ({index.kind}, {index.dim}-d)")


def search_main(argv):
    from absl import flags

    f = flags.FLAGS
    index = DescriptorIndex.load(f.index_dir)
    paths = argv[1:]
    if bool(paths) == bool(f.descriptors):
        raise ValueError("Give either --descriptors or query image files.")
    if f.descriptors:
        queries, names, probe = read_descriptor_file(f.descriptors)
    else:
        describer = Describer(f.server, f.model, f.model_name)
        queries, names, probe = describer.describe_files(paths), paths, describer.probe()
    index.check_probe(probe)
    index.tune(f.refine, f.nprobe, f.ef_search)
    scores, ids = index.search(queries, f.top_k)
    results = []
    for name, row_scores, row_ids in zip(names, scores, ids):
        hits = [{"name": index.names[i], "score": round(float(s), 5)}
                for s, i in zip(row_scores, row_ids) if i >= 0]
        results.append({"query": name, "results": hits})
        print(name)
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:3d}. {hit['score']:.4f}  {hit['name']}")
    if f.output:
        with open(f.output, "w") as fh:
            json.dump(results, fh, indent=1)


def run_index():
    from absl import flags

    _define_common()
    flags.DEFINE_list("images", None, "Image files or folders to index (also positional).")
    flags.DEFINE_enum("kind", "exact", list(KINDS), "Index kind.")
    flags.DEFINE_bool("append", False, "Add to an existing index.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing index.")
    cli.run(index_main, "dplg-index")


def run_search():
    from absl import flags

    _define_common()
    flags.DEFINE_integer("top_k", 10, "Results per query.")
    flags.DEFINE_string("output", None, "Also write the results as JSON here.")
    flags.DEFINE_integer("refine", None, "pq / ivfpq: candidates re-ranked exactly, as a "
                         "multiple of top_k (default: the index's).")
    flags.DEFINE_integer("nprobe", None, "ivfpq: inverted lists scanned per query.")
    flags.DEFINE_integer("ef_search", None, "hnsw: size of the search frontier.")
    cli.run(search_main, "dplg-search")


if __name__ == "__main__":
    sys.exit(run_index())

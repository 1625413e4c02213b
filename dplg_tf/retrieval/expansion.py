"""Query expansion and database-side augmentation of unit descriptors.

alpha-QE (Radenovic et al., TPAMI 2019): a query becomes the normalised sum
of itself and its k nearest database vectors, each weighted by its cosine
similarity to the query raised to the power alpha (negative similarities
count as 0). DBA applies the same to every database vector, with its k
nearest database neighbours, itself included. alpha = 0 gives plain average
QE / DBA; k = 0 leaves the vectors unchanged.

`neighbours(vectors, k) -> (scores [n, k], neighbour vectors [n, k, D])`
finds them: exact inner products by default (dplg_tf.retrieval.knn), or a
DescriptorIndex's own search and stored vectors (`index_neighbours`).
"""

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.retrieval import knn


def normalise(x, in_place=False):
    """Rows scaled to unit L2 norm, float32; `in_place` rescales a float32
    array itself (no copy: at +1M a copy is 2 GB), a block of rows at a time."""
    x = np.asarray(x, np.float32)
    out = x if in_place and x.flags.writeable else np.empty_like(x)
    for start in range(0, len(x), 65536):
        block = x[start:start + 65536]
        out[start:start + 65536] = block / np.maximum(
            np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return out


def exact_neighbours(database):
    """`neighbours(vectors, k)` among the rows of `database`, exactly (retrieval.knn)."""
    database = np.asarray(database, np.float32)

    def neighbours(vectors, k):
        scores, ids = knn.search(vectors, database, k)
        return scores, database[ids]

    return neighbours


EXACT_DBA_LIMIT = 200_000   # "auto": an exact neighbour graph up to this many vectors


def ivf_neighbours(database, nlist=None, nprobe=32, refine=4, seed=0):
    """`neighbours(vectors, k)` among the rows of `database` through an
    approximate FAISS graph: an inverted file of 8-bit scalar-quantised codes
    (a compressed copy, a quarter of the database's size), `nprobe` of
    `nlist` lists scanned per vector, its `refine` x k best re-ranked by their
    exact inner products (which the weights use). `neighbours.recall(k)` measures the
    share of the exact k nearest that it finds, on a sample of rows."""
    import faiss

    database = np.asarray(database, np.float32)
    n, dim = database.shape
    nlist = int(nlist or max(1, min(4096, round(4 * np.sqrt(n)))))
    rng = np.random.default_rng(seed)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist,
                                          faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.train(database[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))])
    for start in range(0, n, 65536):
        index.add(database[start:start + 65536])
    index.nprobe = min(int(nprobe), nlist)

    def search(vectors, k):
        """(exact scores, ids) of the k best of `refine` x k candidates."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        _, ids = index.search(vectors, k * refine)
        scores = np.einsum("nd,nkd->nk", vectors, database[np.maximum(ids, 0)])
        scores = np.where(ids >= 0, scores, -np.inf)
        scores, ids = knn.top_k(scores, k, ids[..., None])
        return scores, ids[..., 0]

    def neighbours(vectors, k):
        scores, ids = search(vectors, k)
        return scores, database[np.maximum(ids, 0)]

    def recall(k, sample=1000):
        rows = database[np.sort(rng.choice(n, min(n, sample), replace=False))]
        exact = knn.search(rows, database, k)[1]
        approx = search(rows, k)[1]
        return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))

    neighbours.recall, neighbours.parts = recall, (quantizer, index)
    return neighbours


def dba_neighbours(database, graph="auto"):
    """(`neighbours` for DBA over `database`, the graph used): "exact" (the
    one kNN), "ivf" (approximate, see ivf_neighbours) or "auto" (exact up to
    EXACT_DBA_LIMIT vectors: exact DBA over N vectors costs N^2 D)."""
    if graph not in ("auto", "exact", "ivf"):
        raise UserError(f"--dba_graph={graph!r} is unknown; use auto, exact or ivf.")
    if graph == "auto":
        graph = "exact" if len(database) <= EXACT_DBA_LIMIT else "ivf"
    if graph == "exact":
        return exact_neighbours(database), "exact"
    return ivf_neighbours(database), "ivf"


def index_neighbours(index):
    """`neighbours(vectors, k)` through a DescriptorIndex (its stored vectors)."""
    def neighbours(vectors, k):
        scores, ids = index.search(vectors, k)
        found = ids >= 0
        scores = np.where(found, scores, -np.inf)  # missing: weight 0 below
        return scores, index.vectors(np.where(found, ids, 0))

    return neighbours


def _weighted_sum(vectors, scores, neighbour_vectors, alpha, include_self):
    # similarity^alpha, negatives as 0 (0^0 = 1: alpha 0 averages); missing (-inf) as 0
    found = np.isfinite(scores)
    weights = np.where(found, np.maximum(np.where(found, scores, 0.0), 0.0) ** alpha, 0.0)
    expanded = np.einsum("nk,nkd->nd", weights.astype(np.float32), neighbour_vectors)
    if include_self:
        expanded = expanded + vectors
    return normalise(expanded)


def alpha_qe(queries, database=None, k=2, alpha=3.0, neighbours=None):
    """Expanded queries [q, D]: the query plus its k nearest database vectors."""
    queries = normalise(queries)
    _check(k, alpha, queries)
    if k == 0 or len(queries) == 0:
        return queries
    scores, found = (neighbours or exact_neighbours(database))(queries, k)
    return _weighted_sum(queries, scores, found, alpha, include_self=True)


def dba(database, k=2, alpha=3.0, neighbours=None, chunk=4096):
    """Augmented database [n, D]: each vector with its k nearest neighbours
    (among `database` itself unless `neighbours` says otherwise; the nearest
    of a vector among its own set is itself). A float32 `database` has its
    rows normalised in place (no copy of a +1M database)."""
    database = normalise(database, in_place=True)   # unit rows stay as they are
    _check(k, alpha, database)
    if k == 0 or len(database) == 0:
        return database
    neighbours = neighbours or exact_neighbours(database)
    out = np.empty_like(database)
    for start in range(0, len(database), chunk):
        part = database[start:start + chunk]
        scores, found = neighbours(part, k)
        out[start:start + chunk] = _weighted_sum(part, scores, found, alpha,
                                                 include_self=False)
    return out


def _check(k, alpha, database):
    if not (k >= 0 and np.isfinite(alpha) and alpha >= 0):
        raise UserError(f"Query expansion needs k >= 0 and alpha >= 0, got k={k}, "
                        f"alpha={alpha}.")
    if database.ndim != 2:
        raise UserError(f"Descriptors must be [N, D], got shape {database.shape}.")


def augment_for_index(index, x, k, alpha):
    """DBA of a batch `x` about to join `index`: each vector with its k nearest
    among the batch and the vectors already stored (which stay as they are)."""
    own = exact_neighbours(normalise(x))
    if not len(index):
        return dba(x, k, alpha, own)
    stored = index_neighbours(index)

    def both(vectors, kk):
        s1, v1 = own(vectors, kk)
        s2, v2 = stored(vectors, kk)
        return knn.top_k(np.concatenate([s1, s2], 1), kk, np.concatenate([v1, v2], 1))

    return dba(x, k, alpha, both)

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

from dplg_tf.retrieval import knn


def normalise(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_neighbours(database):
    """`neighbours(vectors, k)` among the rows of `database`, exactly (retrieval.knn)."""
    database = np.asarray(database, np.float32)

    def neighbours(vectors, k):
        scores, ids = knn.search(vectors, database, k)
        return scores, database[ids]

    return neighbours


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
    of a vector among its own set is itself)."""
    database = normalise(database)
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
    from dplg_tf.errors import UserError

    if k < 0 or alpha < 0:
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

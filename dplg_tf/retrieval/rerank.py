"""Re-ranking of a shortlist with global descriptors alone (SuperGlobal, Shao
et al., ICCV 2023: MDescAug + RerankwMDA), no training.

For each query, its shortlist holds the M nearest database vectors X [M, D]
(unit rows), best first:

1. top-M descriptor augmentation: each X_i becomes the weighted mean of
   itself (weight 1) and its K nearest among the shortlist (weight beta x
   their similarity to X_i): X~_i. The query's first scores are s_i = q . X~_i.
2. the K + 1 best of the shortlist by s give, element-wise, their maximum
   descriptor x*; the final score of X_i is (s_i + x* . X~_i) / 2.

The shortlist is re-ordered by the final score; what lies past M keeps its
order. The work is M x M x D per query and M x D floats of memory: the
shortlist comes from any index kind or from a full ranking
(retrieval.query, where this method is the re-ranker "superglobal"), never
the whole database.
"""

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.retrieval import knn

DEFAULT_M, DEFAULT_K, DEFAULT_BETA = 400, 9, 0.15
DEFAULTS = {"m": DEFAULT_M, "k": DEFAULT_K, "beta": DEFAULT_BETA}
MAX_M = 10000


def check(m, k, beta):
    """A UserError unless 1 <= k < m <= MAX_M and 0 <= beta <= 1 (finite)."""
    if not (isinstance(m, (int, np.integer)) and isinstance(k, (int, np.integer))
            and 1 <= k < m <= MAX_M and np.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise UserError(f"Re-ranking needs 1 <= k < m <= {MAX_M} and 0 <= beta <= 1, got "
                        f"m={m}, k={k}, beta={beta}.")


def rerank(queries, vectors, k=DEFAULT_K, beta=DEFAULT_BETA, valid=None, chunk=16):
    """(scores [q, M], order [q, M]): the final scores of the shortlists
    `vectors` [q, M, D] of `queries` [q, D], and each shortlist's positions in
    their new order (best first). `valid` [q, M] bool marks real entries (an
    index may return fewer than M); the others sort last with score -inf."""
    queries = np.asarray(queries, np.float32)
    vectors = np.asarray(vectors, np.float32)
    n, m = vectors.shape[:2]
    valid = np.ones((n, m), bool) if valid is None else np.asarray(valid, bool)
    scores = np.empty((n, m), np.float32)
    order = np.empty((n, m), np.int64)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        scores[part], order[part] = _rerank_chunk(queries[part], vectors[part], valid[part],
                                                  k, beta)
    return scores, order


def _top(scores, k):
    """(values, columns) of the k best of each row (retrieval.knn.top_k)."""
    columns = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)[..., None]
    values, columns = knn.top_k(scores, k, columns)
    return values, columns[..., 0]


def _rerank_chunk(q, x, valid, k, beta):
    n, m = x.shape[:2]
    kk = min(k + 1, m)   # the neighbours of step 1 and the best of step 2 include the first
    # step 1: the K + 1 nearest of each shortlist vector among its shortlist, as a
    # weight matrix [n, m, m] (1 for the nearest, beta x similarity for the others)
    sims = x @ x.transpose(0, 2, 1)
    sims = np.where(valid[:, None, :], sims, -np.inf)
    near, cols = _top(sims.reshape(-1, m), kk)
    weights = np.where(np.isfinite(near), near * beta, 0.0).astype(np.float32)
    weights[:, 0] = 1.0
    matrix = np.zeros((n * m, m), np.float32)
    np.put_along_axis(matrix, cols, weights, axis=1)
    matrix = matrix.reshape(n, m, m) / np.maximum(weights.sum(-1), 1e-12).reshape(n, m, 1)
    augmented = matrix @ x
    first = np.where(valid, (augmented @ q[:, :, None])[..., 0], -np.inf)
    # step 2: the element-wise maximum of the K + 1 best augmented vectors
    best_scores, best = _top(first, kk)
    top = np.take_along_axis(augmented, best[..., None], axis=1)
    top = np.where(np.isfinite(best_scores)[..., None], top, -np.inf).max(axis=1)
    final = (first + (augmented @ top[:, :, None])[..., 0]) / 2.0
    return _top(np.where(valid, final, -np.inf), m)

"""The one brute-force nearest-neighbour search of the package: inner products
of queries against a database, tiled to a memory budget, with a running
top-k merge. Evaluation (full rankings), alpha-QE, DBA and the exact index
all call `search`.

    scores, ids = search(queries, database, k=10)          # best first
    ranks = search(queries, database, k=len(database))[1]  # a full ranking

The database is read block by block (a float32 array, a memmap or a view of
FAISS' storage is never copied whole); a block's scores and their top-k
temporaries stay within `budget_mb`; ties rank the lower id first.
"""

import concurrent.futures

import numpy as np

DEFAULT_BUDGET_MB = 256
_BYTES_PER_SCORE = 16  # the score (4), its negation for argpartition (4), an int64 index (8)


def top_k(scores, k, *payloads):
    """(scores, *payloads) of the k best columns of each row, best first, ties by
    column order; `payloads` are arrays [n, m, ...] gathered the same way."""
    scores = np.asarray(scores, np.float32)
    k = min(k, scores.shape[1])
    if k < scores.shape[1]:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        keep.sort(axis=1)  # column order, so that the stable sort below breaks ties by it
    else:
        keep = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    kept = np.take_along_axis(scores, keep, 1)
    order = np.argsort(-kept, axis=1, kind="stable")
    columns = np.take_along_axis(keep, order, 1)
    out = [np.take_along_axis(kept, order, 1)]
    for payload in payloads:
        index = columns.reshape(columns.shape + (1,) * (payload.ndim - 2))
        out.append(np.take_along_axis(payload, index, 1))
    return tuple(out)


def search(queries, database, k, budget_mb=DEFAULT_BUDGET_MB, threads=1):
    """(scores [q, k] float32, ids [q, k] int64) of the k largest inner products
    of each query with the rows of `database` [n, D], best first."""
    q = np.ascontiguousarray(queries, np.float32)
    n = len(database)
    k = min(int(k), n)
    if k <= 0 or len(q) == 0:
        return np.zeros((len(q), max(k, 0)), np.float32), np.zeros((len(q), max(k, 0)), np.int64)
    budget = max(1, int(budget_mb * 2 ** 20 / max(1, threads)))
    q_block = max(1, min(len(q), budget // (_BYTES_PER_SCORE * min(n, 4096))))
    d_block = max(1, budget // (_BYTES_PER_SCORE * q_block))
    scores, ids = [], []
    for qs in range(0, len(q), q_block):
        s, i = _search_block(q[qs:qs + q_block], database, k, d_block, threads)
        scores.append(s)
        ids.append(i)
    return np.concatenate(scores), np.concatenate(ids)


def _search_block(q, database, k, d_block, threads):
    """The top-k of a block of queries over the whole database."""
    def block(start):
        rows = np.asarray(database[start:start + d_block], np.float32)
        s, columns = top_k(q @ rows.T, k, np.broadcast_to(
            np.arange(start, start + len(rows), dtype=np.int64), (len(q), len(rows)))[..., None])
        return s, columns[..., 0]

    best_s = np.zeros((len(q), 0), np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    starts = range(0, len(database), d_block)
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for s, i in pool.map(block, starts):  # in order: ties keep the lower id first
            best_s, best_i = top_k(np.concatenate([best_s, s], 1), k,
                                   np.concatenate([best_i, i], 1)[..., None])
            best_i = best_i[..., 0]
    return best_s, best_i


def rank(queries, database, budget_mb=DEFAULT_BUDGET_MB):
    """[n_db, n_query] database indices by descending inner product (the
    Revisited protocol's `ranks`)."""
    return search(queries, database, len(database), budget_mb)[1].T

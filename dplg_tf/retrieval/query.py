"""The query path after description, one for every caller (dplg-eval,
dplg-search, the search server): DBA of the database, alpha-QE of the
queries, a first search, then a re-ranker of RERANKERS over each query's
shortlist.

    settings = Settings(qe_k=2, rerank=True)      # checked here, once
    found = run(queries, database, settings, top_k=10)
    found.scores, found.ids, found.settings.report()

`database` is an array [N, D], searched exactly (retrieval.knn), or an
index with `search(queries, k)` and `vectors(ids)` (search.index; DBA is
then applied when the index is built). `top_k=None` ranks every database
vector, as the Revisited evaluation needs. `found.settings` is what was
done: QE's k is clamped to the database's size and a database of one is
not re-ranked.

A re-ranker is a function `(queries [q, D], vectors [q, M, D], valid [q, M],
**params) -> (scores [q, M], order [q, M])` over the M best of each query;
what lies past M keeps its order. Adding one is an entry in RERANKERS.
"""

import dataclasses
import math
from typing import Callable

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.retrieval import expansion, knn, rerank

MAX_K = 1000        # neighbours for QE / DBA: more is no expansion but a blow-up
MAX_ALPHA = 100.0   # similarity exponents: finite (inf and nan are refused)
DBA_GRAPHS = ("auto", "exact", "ivf")


@dataclasses.dataclass(frozen=True)
class Reranker:
    """A re-ranking method: `rerank` as the module docstring says, its
    parameters' `defaults` (`m`, the shortlist's length, among them) and
    `check(**params)`, which raises a UserError for bad ones."""
    rerank: Callable
    defaults: dict
    check: Callable


RERANKERS = {
    "superglobal": Reranker(
        lambda queries, vectors, valid, k, beta: rerank.rerank(queries, vectors, k, beta, valid),
        rerank.DEFAULTS, rerank.check),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What is done to a query after its description; checked when made."""
    qe_k: int = 0
    qe_alpha: float = 3.0
    dba_k: int = 0
    dba_alpha: float = 3.0
    dba_graph: str = "auto"
    rerank: bool = False
    reranker: str = "superglobal"
    rerank_params: dict = None   # the reranker's defaults where None or left out

    def __post_init__(self):
        for name in ("qe_k", "dba_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
                    0 <= value <= MAX_K):
                raise UserError(f"{name} must be an integer from 0 to {MAX_K}, got {value!r}.")
        for name in ("qe_alpha", "dba_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or (
                    not math.isfinite(value) or not 0 <= value <= MAX_ALPHA):
                raise UserError(f"{name} must be a number from 0 to {MAX_ALPHA:g}, got "
                                f"{value!r}.")
        if self.dba_graph not in DBA_GRAPHS:
            raise UserError(f"dba_graph {self.dba_graph!r} is unknown; use one of "
                            f"{', '.join(DBA_GRAPHS)}.")
        method = RERANKERS.get(self.reranker)
        if method is None:
            raise UserError(f"The re-ranker {self.reranker!r} is unknown; use one of "
                            f"{', '.join(sorted(RERANKERS))}.")
        unknown = sorted(set(self.rerank_params or {}) - set(method.defaults))
        if unknown:
            raise UserError(f"The re-ranker {self.reranker!r} takes {sorted(method.defaults)}, "
                            f"not {unknown}.")
        params = dict(method.defaults, **(self.rerank_params or {}))
        method.check(**params)
        object.__setattr__(self, "qe_k", int(self.qe_k))
        object.__setattr__(self, "dba_k", int(self.dba_k))
        object.__setattr__(self, "qe_alpha", float(self.qe_alpha))
        object.__setattr__(self, "dba_alpha", float(self.dba_alpha))
        object.__setattr__(self, "rerank", bool(self.rerank))
        object.__setattr__(self, "rerank_params", params)

    def replace(self, **changes):
        """These settings with `changes`, checked again."""
        return dataclasses.replace(self, **changes)

    def report(self):
        """What an answer or a results file says was done."""
        out = {"qe_k": self.qe_k, "qe_alpha": self.qe_alpha if self.qe_k else None,
               "dba_k": self.dba_k, "dba_alpha": self.dba_alpha if self.dba_k else None,
               "dba_graph": self.dba_graph if self.dba_k else None,
               "rerank": self.rerank, "reranker": self.reranker}
        return dict(out, **self.rerank_params)


OFF = Settings()


@dataclasses.dataclass
class Found:
    """The answer of `run`: `scores` and `ids` [q, top_k] best first (ids -1
    where an index has fewer), the `queries` as searched (unit, after QE) and
    the `settings` as done."""
    scores: np.ndarray
    ids: np.ndarray
    queries: np.ndarray
    settings: Settings


class Exact:
    """An array of database vectors as an index: the one exact kNN."""

    def __init__(self, vectors):
        self.array = vectors

    def __len__(self):
        return len(self.array)

    def search(self, queries, k):
        return knn.search(queries, self.array, k)

    def vectors(self, ids):
        return np.asarray(self.array[np.asarray(ids, np.int64)], np.float32)


def run(queries, database, settings=OFF, top_k=None, log=None):
    """`Found` of `queries` [q, D] over `database` (see the module docstring).
    An array database is augmented in place when DBA is on (at +1M a copy
    would double the memory); `log(sentence)` hears how DBA's graph did."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2:
        raise UserError(f"Queries must be [N, D], got shape {list(queries.shape)}.")
    dense = isinstance(database, np.ndarray)
    if settings.dba_k:
        if not dense:
            raise UserError("DBA changes the database: apply it when the index is built "
                            "(dplg-index --dba_k), not to a search.")
        database = _dba(database, settings, log)
    searcher = Exact(database) if dense else database
    size = len(searcher)
    done = settings.replace(qe_k=min(settings.qe_k, size),
                            rerank=settings.rerank and size >= 2)
    if done.qe_k:
        neighbours = (expansion.exact_neighbours(database) if dense
                      else expansion.index_neighbours(database))
        queries = expansion.alpha_qe(queries, k=done.qe_k, alpha=done.qe_alpha,
                                     neighbours=neighbours)
    else:
        queries = expansion.normalise(queries)
    top_k = size if top_k is None else int(top_k)
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}.")
    if not len(queries):
        return Found(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64), queries, done)
    params = done.rerank_params
    scores, ids = searcher.search(queries, max(top_k, params["m"]) if done.rerank else top_k)
    if done.rerank:
        _rerank_shortlists(searcher, queries, scores, ids, RERANKERS[done.reranker], params)
    return Found(scores[:, :top_k], ids[:, :top_k], queries, done)


def _dba(database, settings, log):
    database = expansion.normalise(database, in_place=True)
    neighbours, graph = expansion.dba_neighbours(database, settings.dba_graph)
    if graph != "exact" and log is not None:
        log(f"DBA over {len(database)} descriptors with an approximate ({graph}) "
            f"neighbour graph: recall@{settings.dba_k} "
            f"{neighbours.recall(settings.dba_k):.3f} against exact on 1000 rows")
    return expansion.dba(database, settings.dba_k, settings.dba_alpha, neighbours)


def _rerank_shortlists(searcher, queries, scores, ids, method, params, chunk=64):
    """Re-order the first m of each row of `ids` (and `scores`) in place; the
    vectors of `chunk` shortlists are read at a time (chunk x m x D floats)."""
    m = min(params["m"], ids.shape[1])
    if m < 2:
        return
    others = {k: v for k, v in params.items() if k != "m"}
    for start in range(0, len(ids), chunk):
        part = slice(start, start + chunk)
        head = ids[part, :m]
        valid = head >= 0
        final, order = method.rerank(queries[part], searcher.vectors(np.where(valid, head, 0)),
                                     valid, **others)
        ids[part, :m] = np.where(np.isfinite(final), np.take_along_axis(head, order, 1), -1)
        scores[part, :m] = final

"""Shortlist re-ranking (MDescAug + RerankwMDA) against a direct NumPy
transcription of the method, and over every index kind."""

import numpy as np
import pytest

from dplg_tf.errors import UserError
from dplg_tf.retrieval import knn, query, rerank
from dplg_tf.search.index import DescriptorIndex


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n, d, seed, clusters=20, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = _unit(clusters, d, seed + 1)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference(X, Q, ranks, M, K, beta):
    """SuperGlobal's two steps written out query by query, loop by loop, in
    float64: `ranks` [n_db, n_query] -> the re-ranked full ranking."""
    X, Q = X.astype(np.float64), Q.astype(np.float64)
    kk = K + 1
    out = ranks.copy()
    for qi in range(Q.shape[0]):
        short = ranks[:M, qi]
        xs = X[short]
        aug = np.zeros_like(xs)
        for i in range(M):
            sims = xs @ xs[i]
            nearest = sorted(range(M), key=lambda j: (-sims[j], j))[:kk]
            w = np.array([1.0] + [beta * sims[j] for j in nearest[1:]])
            aug[i] = (w[:, None] * xs[nearest]).sum(0) / w.sum()
        s = aug @ Q[qi]
        order = sorted(range(M), key=lambda j: (-s[j], j))
        best = aug[order[:kk]].max(axis=0)
        final = np.array([(s[j] + best @ aug[j]) / 2.0 for j in range(M)])
        new = sorted(range(M), key=lambda j: (-final[j], j))
        out[:M, qi] = short[new]
    return out


def _settings(m=400, k=9, beta=0.15):
    return query.Settings(rerank=True, rerank_params={"m": m, "k": k, "beta": beta})


def test_rerank_equals_the_reference_transcription():
    db, q = _clustered(600, 32, 0), _clustered(5, 32, 7)
    ranks = knn.rank(q, db)
    for m, k, beta in ((50, 9, 0.15), (80, 3, 0.5), (20, 1, 0.0)):
        got = query.run(q, db, _settings(m, k, beta)).ids.T
        want = reference(db, q, ranks, m, k, beta)
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got[:m], ranks[:m])   # it did re-order something
        np.testing.assert_array_equal(got[m:], ranks[m:])   # the rest kept its order


def test_rerank_scores_are_the_methods_final_scores():
    x, q = _unit(30, 16, 3)[None], _unit(1, 16, 4)
    scores, order = rerank.rerank(q, x, k=4, beta=0.2)
    assert np.all(np.diff(scores[0]) <= 1e-7)                 # best first
    assert sorted(order[0]) == list(range(30))                # a permutation
    # the best entry's score recomputed from its definition
    xs = x[0].astype(np.float64)
    sims = xs @ xs.T
    aug = []
    for i in range(30):
        near = np.argsort(-sims[i], kind="stable")[:5]
        w = np.r_[1.0, 0.2 * sims[i, near[1:]]]
        aug.append((w[:, None] * xs[near]).sum(0) / w.sum())
    aug = np.array(aug)
    s = aug @ q[0]
    best = aug[np.argsort(-s, kind="stable")[:5]].max(0)
    final = (s + aug @ best) / 2
    np.testing.assert_allclose(scores[0], np.sort(final)[::-1], atol=1e-5)


def test_invalid_entries_sort_last():
    x, q = _unit(12, 8, 5)[None], _unit(1, 8, 6)
    valid = np.ones((1, 12), bool)
    valid[0, [2, 7]] = False
    scores, order = rerank.rerank(q, x, 3, 0.15, valid)
    assert set(order[0, -2:]) == {2, 7} and np.all(np.isinf(scores[0, -2:]))
    assert np.all(np.isfinite(scores[0, :-2]))


@pytest.mark.parametrize("kind", ["exact", "pq", "hnsw", "ivfpq"])
def test_rerank_over_every_index_kind_equals_the_exact_rerank(kind):
    """When the index's shortlist is the exact top M, re-ranking over it gives
    the exact re-ranking; the shortlist check keeps the test honest."""
    db, q = _clustered(2000, 32, 10), _clustered(6, 32, 11)
    m, top_k = 60, 20
    index = DescriptorIndex(32, kind, refine=40, nprobe=64, ef_search=512, nlist=16,
                            pq_m=8)
    index.add(db, [f"i{n}" for n in range(len(db))])
    exact = knn.rank(q, db)
    _, shortlist = index.search(q, m)
    for row, col in zip(shortlist, exact[:m].T):
        assert set(row) == set(col), "the approximate shortlist must hold the exact top M"
    found = query.run(q, index, _settings(m), top_k)
    scores, ids = found.scores, found.ids
    want = query.run(q, db, _settings(m)).ids[:, :top_k]
    np.testing.assert_array_equal(ids, want)
    assert scores.shape == (6, top_k) and np.all(np.diff(scores, axis=1) <= 1e-6)


def test_rerank_with_fewer_vectors_than_m():
    db, q = _unit(30, 8, 12), _unit(2, 8, 13)
    index = DescriptorIndex(8, "exact")
    index.add(db, [str(i) for i in range(30)])
    found = query.run(q, index, _settings(), 10)
    scores, ids = found.scores, found.ids
    assert ids.shape == (2, 10) and np.all(ids >= 0) and np.all(np.isfinite(scores))


@pytest.mark.parametrize("m,k,beta", [(10, 10, 0.1), (0, 0, 0.1), (400, 9, -0.1),
                                      (400, 9, float("nan")), (10 ** 6, 9, 0.1)])
def test_bad_settings_are_refused(m, k, beta):
    with pytest.raises(UserError, match="Re-ranking needs"):
        rerank.check(m, k, beta)

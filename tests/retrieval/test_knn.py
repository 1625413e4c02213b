"""The one brute-force kNN: tiled, merged, exact."""

import numpy as np
import pytest

from dplg_tf.retrieval import knn


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _direct(q, db, k):
    s = q @ db.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.mark.parametrize("budget_mb,threads", [(256, 1), (1e-4, 1), (2e-3, 3)])
def test_search_equals_a_direct_sort_whatever_the_tiling(budget_mb, threads):
    db, q = _unit(500, 16, 0), _unit(37, 16, 1)
    for k in (1, 7, 500, 900):
        scores, ids = knn.search(q, db, k, budget_mb=budget_mb, threads=threads)
        want_s, want_i = _direct(q, db, min(k, 500))
        np.testing.assert_array_equal(ids, want_i)
        np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-6)
        assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_ties_rank_the_lower_id_first_across_blocks():
    db = np.tile(np.eye(4, dtype=np.float32), (5, 1))   # each direction 5 times
    q = np.eye(4, dtype=np.float32)[:2]
    _, ids = knn.search(q, db, 5, budget_mb=1e-5)          # one block of a few rows
    assert ids.tolist() == [[0, 4, 8, 12, 16], [1, 5, 9, 13, 17]]


def test_rank_is_the_full_ranking_by_descending_score():
    db, q = _unit(60, 8, 2), _unit(5, 8, 3)
    np.testing.assert_array_equal(knn.rank(q, db, budget_mb=1e-3),
                                  np.argsort(-(db @ q.T), axis=0, kind="stable"))


def test_top_k_gathers_payloads_and_empty_inputs_give_empty_results():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.7]], np.float32)
    vectors = np.arange(18, dtype=np.float32).reshape(2, 3, 3)
    s, v = knn.top_k(scores, 2, vectors)
    np.testing.assert_allclose(s, [[0.9, 0.5], [0.7, 0.3]])
    np.testing.assert_array_equal(v[0], vectors[0, [1, 2]])
    np.testing.assert_array_equal(v[1], vectors[1, [2, 0]])
    s, i = knn.search(np.zeros((0, 4)), _unit(3, 4, 0), 2)
    assert s.shape == (0, 2) and i.shape == (0, 2)
    s, i = knn.search(_unit(2, 4, 0), np.zeros((0, 4), np.float32), 2)
    assert s.shape == (2, 0)


def test_the_database_is_read_block_by_block_not_copied():
    """A memmap of the database is searched without loading it whole."""
    class Rows:
        def __init__(self, x):
            self.x, self.largest = x, 0

        def __len__(self):
            return len(self.x)

        def __getitem__(self, key):
            block = self.x[key]
            self.largest = max(self.largest, len(block))
            return block

    db = Rows(_unit(2000, 8, 4))
    scores, ids = knn.search(_unit(3, 8, 5), db, 5, budget_mb=0.01)
    assert db.largest <= 0.01 * 2 ** 20 // 16 < len(db.x)
    np.testing.assert_array_equal(ids, _direct(_unit(3, 8, 5), db.x, 5)[1])

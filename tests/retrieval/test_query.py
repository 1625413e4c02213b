"""The one query path (retrieval.query): its settings, checked once, the same
answers over an array and over an index, and re-rankers as registry entries."""

import numpy as np
import pytest

from dplg_tf.errors import UserError
from dplg_tf.retrieval import expansion, knn, query
from dplg_tf.search.index import DescriptorIndex


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("changes,match", [
    ({"qe_k": -1}, "qe_k must be an integer from 0"),
    ({"qe_k": 2.5}, "qe_k must be an integer"),
    ({"dba_k": True}, "dba_k must be an integer"),
    ({"qe_alpha": float("nan")}, "qe_alpha must be a number"),
    ({"dba_alpha": 1e9}, "dba_alpha must be a number"),
    ({"dba_graph": "guess"}, "dba_graph 'guess' is unknown"),
    ({"reranker": "magic"}, "re-ranker 'magic' is unknown"),
    ({"rerank_params": {"m": 5, "k": 9}}, "Re-ranking needs 1 <= k < m"),
    ({"rerank_params": {"depth": 3}}, "takes"),
])
def test_bad_settings_are_refused_when_made(changes, match):
    with pytest.raises(UserError, match=match):
        query.Settings(**changes)
    with pytest.raises(UserError, match=match):
        query.OFF.replace(**changes)


def test_the_report_says_what_is_done():
    s = query.Settings(qe_k=2, rerank=True, rerank_params={"m": 50})
    assert s.report() == {"qe_k": 2, "qe_alpha": 3.0, "dba_k": 0, "dba_alpha": None,
                          "dba_graph": None, "rerank": True, "reranker": "superglobal",
                          "m": 50, "k": 9, "beta": 0.15}
    assert query.Settings(dba_k=3, dba_graph="ivf").report()["dba_graph"] == "ivf"
    assert query.OFF.report()["qe_alpha"] is None and query.OFF.report()["rerank"] is False


def test_an_array_and_an_exact_index_give_one_answer():
    db, q = _unit(300, 16, 0), _unit(4, 16, 1)
    index = DescriptorIndex(16, "exact")
    index.add(db, [str(i) for i in range(len(db))])
    for settings in (query.OFF, query.Settings(qe_k=3), query.Settings(rerank=True),
                     query.Settings(qe_k=2, qe_alpha=1.0, rerank=True,
                                    rerank_params={"m": 40, "k": 3, "beta": 0.3})):
        on_array = query.run(q, db.copy(), settings, top_k=10)
        on_index = query.run(q, index, settings, top_k=10)
        np.testing.assert_array_equal(on_array.ids, on_index.ids)
        np.testing.assert_allclose(on_array.scores, on_index.scores, atol=1e-5)
        assert on_array.settings == on_index.settings == settings


def test_without_top_k_every_vector_is_ranked():
    db, q = _unit(50, 8, 2), _unit(3, 8, 3)
    found = query.run(q, db, query.OFF)
    assert found.ids.shape == (3, 50)
    np.testing.assert_array_equal(found.ids.T, knn.rank(q, db))


def test_expansion_is_the_expansion_modules():
    db, q = _unit(200, 8, 4), _unit(3, 8, 5)
    settings = query.Settings(qe_k=2, qe_alpha=3.0, dba_k=3, dba_alpha=2.0,
                              dba_graph="exact")
    found = query.run(q, db.copy(), settings, top_k=7)
    augmented = expansion.dba(db.copy(), 3, 2.0)
    expanded = expansion.alpha_qe(q, augmented, 2, 3.0)
    np.testing.assert_allclose(found.queries, expanded, atol=1e-6)
    np.testing.assert_array_equal(found.ids, knn.search(expanded, augmented, 7)[1])


def test_what_was_done_is_clamped_to_the_database():
    one = _unit(1, 8, 6)
    found = query.run(_unit(2, 8, 7), one, query.Settings(qe_k=5, rerank=True), top_k=3)
    assert found.settings.qe_k == 1 and found.settings.rerank is False
    assert found.ids.shape == (2, 1)


def test_dba_is_refused_on_an_index():
    index = DescriptorIndex(8, "exact")
    index.add(_unit(10, 8, 8), [str(i) for i in range(10)])
    with pytest.raises(UserError, match="when the index is built"):
        query.run(_unit(1, 8, 9), index, query.Settings(dba_k=2), top_k=3)


def test_a_new_reranker_is_one_registry_entry(monkeypatch):
    """A method that reverses each shortlist: only the first m move, and the
    answer names it."""
    def reverse(queries, vectors, valid):
        n, m = valid.shape
        return (np.tile(np.arange(m, dtype=np.float32), (n, 1)),
                np.tile(np.arange(m)[::-1], (n, 1)))

    monkeypatch.setitem(query.RERANKERS, "reverse",
                        query.Reranker(reverse, {"m": 5}, lambda m: None))
    db, q = _unit(20, 8, 10), _unit(2, 8, 11)
    plain = query.run(q, db, query.OFF, top_k=8)
    found = query.run(q, db, query.Settings(rerank=True, reranker="reverse"), top_k=8)
    np.testing.assert_array_equal(found.ids[:, :5], plain.ids[:, 4::-1])
    np.testing.assert_array_equal(found.ids[:, 5:], plain.ids[:, 5:])
    assert found.settings.report()["reranker"] == "reverse"

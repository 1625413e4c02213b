"""Whitening, alpha-QE and DBA on descriptors the tests make themselves."""

import numpy as np
import pytest

from dplg_tf.retrieval import expansion
from dplg_tf.retrieval import whitening
from dplg_tf.storage import whitening as whitening_file
from dplg_tf.errors import UserError


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_alpha_qe_adds_the_weighted_neighbours():
    db = _unit([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1], [-1, 0, 0]])
    q = _unit([[1, 0.1, 0]])
    s = (q @ db.T)[0]
    np.testing.assert_allclose(expansion.alpha_qe(q, db, k=0), q)
    # average QE (alpha 0) of the 2 nearest: the query plus db[0] and db[1]
    np.testing.assert_allclose(expansion.alpha_qe(q, db, k=2, alpha=0),
                               _unit(q + db[0] + db[1]), atol=1e-6)
    want = _unit(q + s[0] ** 3 * db[0] + s[1] ** 3 * db[1])
    np.testing.assert_allclose(expansion.alpha_qe(q, db, k=2, alpha=3), want, atol=1e-6)
    # a neighbour with negative similarity adds nothing when alpha > 0
    two = db[[1, 3]]  # one similar, one opposite
    np.testing.assert_allclose(expansion.alpha_qe(q, two, k=2, alpha=3),
                               _unit(q + s[1] ** 3 * db[1]), atol=1e-6)


def test_dba_with_k_1_changes_nothing_and_k_2_pulls_neighbours_together():
    rng = np.random.default_rng(1)
    db = _unit(rng.normal(size=(30, 16)))
    np.testing.assert_allclose(expansion.dba(db, k=1, alpha=0), db, atol=1e-6)
    out = expansion.dba(db, k=2, alpha=0, chunk=7)
    nearest = np.argsort(-(db @ db.T), axis=1)[:, 1]
    np.testing.assert_allclose(out, _unit(db + db[nearest]), atol=1e-5)
    with pytest.raises(UserError, match="k >= 0"):
        expansion.dba(db, k=-1)


def _classes(n_classes=20, per_class=10, dim=16, nuisance=10.0, views=0):
    """Unit descriptors whose classes differ in all directions but whose views
    vary most along two nuisance directions; `views` seeds the views."""
    centres = np.random.default_rng(0).normal(size=(n_classes, dim))
    rng = np.random.default_rng(100 + views)
    labels = np.repeat(np.arange(n_classes), per_class)
    noise = rng.normal(size=(len(labels), dim)) * 0.3
    noise[:, :2] += rng.normal(size=(len(labels), 2)) * nuisance
    return _unit(centres[labels] + noise), labels


def _nn_accuracy(x, labels):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return float(np.mean(labels[np.argmax(s, axis=1)] == labels))


def test_pca_whitening_decorrelates_the_training_descriptors():
    x, _ = _classes()
    mean, projection = whitening.learn_pca(x, 8, shrinkage=0.0)
    assert mean.shape == (16,) and projection.shape == (8, 16)
    y = (x - mean) @ projection.T
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(8), atol=1e-3)
    out = whitening.apply(x, mean, projection)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_supervised_whitening_learns_to_ignore_the_nuisance():
    x, labels = _classes(views=0)
    mean, projection = whitening.learn_supervised(x, labels, 16)
    other, other_labels = _classes(views=1)  # the same classes, other views
    raw = _nn_accuracy(other, other_labels)
    white = _nn_accuracy(whitening.apply(other, mean, projection), other_labels)
    assert raw < 0.7 and white > 0.95, (raw, white)
    assert whitening.learn_supervised(x, labels, 4)[1].shape == (4, 16)
    with pytest.raises(UserError, match="two images"):
        whitening.learn_supervised(x[:3], [0, 1, 2], 4)
    with pytest.raises(UserError, match="1..16"):
        whitening.learn_pca(x, 17)


def test_whitening_file_round_trip_and_refusals(tmp_path):
    x, labels = _classes()
    mean, projection = whitening.learn_supervised(x, labels, 8)
    path = str(tmp_path / "w.npz")
    whitening_file.save(path, mean, projection, kind="supervised", probe=[0.5, 0.5])
    m, p, meta = whitening_file.load(path)
    np.testing.assert_array_equal(m, mean)
    np.testing.assert_array_equal(p, projection)
    assert meta == {"kind": "supervised", "probe": [0.5, 0.5]}
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable whitening file"):
        whitening_file.load(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "shape.npz", mean=np.zeros(3), projection=np.zeros((2, 4)),
             metadata=np.array("{}"))
    with pytest.raises(UserError, match="do not fit together"):
        whitening_file.load(str(tmp_path / "shape.npz"))
    with pytest.raises(FileNotFoundError):
        whitening_file.load(str(tmp_path / "missing.npz"))


def test_matching_pairs_are_sampled_per_class_without_building_them_all():
    labels = np.repeat(np.arange(50), np.arange(1, 51))        # 1275 images, 20825 pairs
    i, j = whitening.matching_pairs(labels, max_pairs=1000, seed=3)
    assert len(i) == 1000 and np.all(labels[i] == labels[j]) and np.all(i != j)
    big = np.bincount(labels[i], minlength=50)                 # in proportion to the pairs
    assert big[49] > big[10] and big[0] == 0
    i, j = whitening.matching_pairs([0, 0, 0, 1, 2, 2], max_pairs=1000)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2), (4, 5)]
    with pytest.raises(UserError, match="two images"):
        whitening.matching_pairs([0, 1, 2])


def test_dba_over_an_approximate_graph_reports_its_recall_and_matches_exact():
    """Clustered descriptors (as real ones are): the IVF graph finds the exact
    neighbours, so DBA through it equals exact DBA; its recall is measured."""
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(60, 32)))
    db = _unit(centres[rng.integers(0, 60, 3000)] + 0.05 * rng.normal(size=(3000, 32)))
    approx = expansion.ivf_neighbours(db)
    assert approx.recall(3) >= 0.95
    exact = expansion.dba(db, 3, 3.0)
    through_graph = expansion.dba(db, 3, 3.0, approx)
    close = np.mean(np.all(np.abs(exact - through_graph) < 1e-4, axis=1))
    assert close >= 0.95
    neighbours, graph = expansion.dba_neighbours(db, "auto")
    assert graph == "exact"
    with pytest.raises(UserError, match="dba_graph"):
        expansion.dba_neighbours(db, "hnsw2")


def test_held_out_classes_choose_the_whitening_that_helps():
    x, labels = _classes(n_classes=30)
    raw, rows = whitening.held_out_table(x, labels, "supervised", [16, 8], [None], 0.3)
    assert raw < 50 and rows[0][2] > 95 and rows[0][0] == 16, (raw, rows)
    assert [r[2] for r in rows] == sorted((r[2] for r in rows), reverse=True)
    whitening.check_gain({"held_out": {"raw_map": raw, "whitened_map": rows[0][2]}})
    raw, rows = whitening.held_out_table(x, labels, "pca", [16], [0.01, 1.0], 0.3)
    assert {r[1] for r in rows} == {0.01, 1.0}
    # given held-out records (other views here): every row of x trains, those measure
    other = _classes(n_classes=30, views=1)
    raw, rows = whitening.held_out_table(x, labels, "supervised", [16], [None], 0.3,
                                         held_out=other)
    mean, projection = whitening.learn_supervised(x, labels, 16)
    from dplg_tf.retrieval.evaluation import labelled_map

    assert rows[0][2] == pytest.approx(labelled_map(whitening.apply(other[0], mean, projection),
                                                    other[1]))
    assert raw == pytest.approx(labelled_map(*other)) and rows[0][2] > raw


def test_a_whitening_learned_on_a_thin_set_is_refused_unless_forced():
    """30 classes of 2 images in 64-d: every whitening learned on the training
    classes makes the held-out classes worse, and check_gain says so."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 2)
    x = _unit(rng.normal(size=(30, 64))[labels] + rng.normal(size=(60, 64)) * 1.5)
    for kind in whitening.KINDS:
        raw, rows = whitening.held_out_table(x, labels, kind, [64, 32, 16],
                                             list(whitening.SHRINKAGES), 0.3)
        assert rows[0][2] < raw, (kind, raw, rows)
        meta = {"held_out": {"raw_map": raw, "whitened_map": rows[0][2]}}
        with pytest.raises(whitening.WhiteningHurts, match="--force"):
            whitening.check_gain(meta)
        whitening.check_gain(meta, force=True)
    with pytest.raises(UserError, match="cannot be measured"):
        whitening.split_classes(labels[:6], 0.2)
    train, held = whitening.split_classes(labels, 0.3)
    assert not set(labels[train]) & set(labels[held]) and len(set(labels[held])) == 9

"""The Revisited evaluation and the pictures."""

import os

import numpy as np
import pytest

from dplg_tf.retrieval import eval_run, evaluation
from dplg_tf.retrieval.cache import extract
from dplg_tf.retrieval import pictures


# ------------------------------------------------------------- compute_map

def test_compute_ap_vector():
    assert evaluation.compute_ap([0, 2, 5], 3) == pytest.approx(0.677778, abs=1e-6)


def test_compute_map_vectors():
    ranks = np.array([[4, 2, 0, 1, 3], [0, 2, 4, 1, 3], [0, 1, 2, 3, 4]]).T
    gnd = [{"ok": [0, 1], "junk": [2]}, {"ok": [0, 4], "junk": []}, {"ok": [], "junk": []}]
    m, aps, pr, prs = evaluation.compute_map(ranks, gnd, kappas=(1, 2, 5))
    np.testing.assert_allclose(aps[:2], [0.416667, 0.791667], atol=1e-6)
    assert np.isnan(aps[2]) and np.all(np.isnan(prs[2]))
    assert m == pytest.approx(0.604167, abs=1e-6)
    np.testing.assert_allclose(pr, [0.5, 0.5, 0.666667], atol=1e-6)


def _direct_protocol(ranking, ok, junk):
    """The protocol written out plainly: drop junk, then trapezoidal AP and P@k."""
    kept = [x for x in ranking if x not in set(junk)]
    hits = [i for i, x in enumerate(kept) if x in set(ok)]
    ap = 0.0
    for j, r in enumerate(hits):
        ap += ((1.0 if r == 0 else j / r) + (j + 1) / (r + 1)) / 2 / len(ok)
    last = hits[-1] + 1
    prk = [sum(1 for h in hits if h + 1 <= min(k, last)) / min(k, last) for k in (1, 5, 10)]
    return ap, prk


def test_compute_map_agrees_with_a_direct_implementation():
    rng = np.random.default_rng(0)
    n_db, n_q = 60, 25
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd, want_ap, want_pr = [], [], []
    for q in range(n_q):
        chosen = rng.permutation(n_db)
        ok = list(chosen[: rng.integers(0, 8)])
        junk = list(chosen[20: 20 + rng.integers(0, 10)])
        gnd.append({"ok": ok, "junk": junk})
        if ok:
            ap, prk = _direct_protocol(list(ranks[:, q]), ok, junk)
            want_ap.append(ap)
            want_pr.append(prk)
    m, aps, pr, _ = evaluation.compute_map(ranks, gnd)
    np.testing.assert_allclose(aps[~np.isnan(aps)], want_ap, atol=1e-12)
    assert m == pytest.approx(np.mean(want_ap), abs=1e-12)
    np.testing.assert_allclose(pr, np.mean(want_pr, axis=0), atol=1e-12)


def test_perfect_and_reversed_rankings():
    gnd = [{"ok": [0, 1, 2], "junk": [3]}]
    best = np.array([[0, 1, 2, 3, 4, 5]]).T
    m, *_ = evaluation.compute_map(best, gnd)
    assert m == pytest.approx(1.0)
    junk_first = np.array([[3, 0, 1, 2, 4, 5]]).T  # junk ahead of positives costs nothing
    assert evaluation.compute_map(junk_first, gnd)[0] == pytest.approx(1.0)
    worst = np.array([[5, 4, 3, 2, 1, 0]]).T
    assert evaluation.compute_map(worst, gnd)[0] < 0.7


def test_rank_orders_by_inner_product():
    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.3, 0.0]], np.float32)
    from dplg_tf.retrieval import knn

    assert knn.rank(q, db)[:, 0].tolist() == [1, 2, 0, 3]


def test_markdown_table_side_by_side():
    row = {"mAP": 10.0, "mP@1": 20.0}
    table = evaluation.markdown_table({"untrained": {"easy": row}, "trained": {"easy": row}})
    assert "| untrained | Easy | 10.00 | 20.00 |" in table
    assert "| trained | Easy | 10.00 | 20.00 |" in table


# -------------------------------------------------------------- pictures

def test_pictures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    attention = rng.random((4, 6))
    a = pictures.attention_figure([(image, attention, "query"), (image, attention, "top-1")],
                                  str(tmp_path / "att.png"))
    r = pictures.ranked_sheet(image, [(image, "positive", "a"), (image, "negative", "b"),
                                      (image, "junk", "c")], str(tmp_path / "ranked.png"))
    for path in (a, r):
        assert os.path.getsize(path) > 5000
    from PIL import Image

    sheet = np.asarray(Image.open(r).convert("RGB"))
    green = np.all(sheet == [0x1A, 0x98, 0x50], axis=-1).sum()
    red = np.all(sheet == [0xD7, 0x30, 0x27], axis=-1).sum()
    assert green > 100 and red > 100  # the borders are drawn
    from dplg_tf.images.attention import overlay

    overlay = overlay(image, attention)
    assert overlay.shape == (64, 96, 3) and 0 <= overlay.min() and overlay.max() <= 1


# ----------------------------------------------------------- the cache

class _CountingDescriber:
    """multiscale() of an image is its mean colour; fails after `fail_after` calls."""

    identity = "fake/1"

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def probe(self):
        return np.ones(3, np.float32) / np.sqrt(3)

    def multiscale(self, image, scales):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("killed")
        self.calls += 1
        return {"global_descriptor": image.reshape(-1, 3).mean(0).astype(np.float32)}


def test_extraction_cache_resumes_at_the_first_unfinished_chunk(tmp_path):
    from PIL import Image

    jobs = []
    for i in range(10):
        path = str(tmp_path / f"im{i}.png")
        Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(path)
        jobs.append((path, None))
    folder = str(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="killed"):
        extract(_CountingDescriber(fail_after=7), [1.0], jobs, folder, "db",
                chunk=3, progress=False, workers=1)
    again = _CountingDescriber()
    rows = extract(again, [1.0], jobs, folder, "db", chunk=3, progress=False,
                   workers=1)
    assert again.calls == 3          # the 7 images described before the failure were kept
    np.testing.assert_allclose(rows[:, 0], 20.0 * np.arange(10))
    third = _CountingDescriber()
    np.testing.assert_allclose(extract(third, [1.0], jobs, folder, "db", chunk=3,
                                       progress=False), rows)
    assert third.calls == 0          # the finished file is read back


def test_distractor_files_are_checked_against_the_model(tmp_path):
    """An .npz from another model, an .npz described at other scales than the
    evaluation's, and an .npy (no probe) are refused in one sentence."""
    from dplg_tf.errors import UserError
    from dplg_tf.storage.descriptors import write_npz

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 4)).astype(np.float32)
    probe = np.array([0.5, 0.5, 0.5, 0.5], np.float32)
    ours = str(tmp_path / "ours.npz")
    write_npz(ours, [f"d{i}" for i in range(5)], rows, probe)
    scales = [0.5, 1.0]
    np.testing.assert_allclose(eval_run.load_distractors(ours, 4, probe, scales, scales), rows)
    with pytest.raises(UserError, match="another model"):
        eval_run.load_distractors(ours, 4, -probe, scales, scales)
    with pytest.raises(UserError, match="at the export's scales"):
        eval_run.load_distractors(ours, 4, probe, [1.0], scales)
    with pytest.raises(UserError, match="4"):
        eval_run.load_distractors(ours, 8, probe, scales, scales)
    bare = str(tmp_path / "bare.npy")
    np.save(bare, rows)
    with pytest.raises(UserError, match="no probe descriptor.*--allow_unverified"):
        eval_run.load_distractors(bare, 4, probe, scales, scales)
    np.testing.assert_allclose(eval_run.load_distractors(
        bare, 4, probe, scales, scales, allow_unverified=True), rows)
    np.save(bare, np.full((2, 4), np.nan, np.float32))
    with pytest.raises(UserError, match="finite"):
        eval_run.load_distractors(bare, 4, probe, scales, scales, allow_unverified=True)


def test_labelled_map_of_a_large_set_samples_its_queries():
    from dplg_tf.retrieval.evaluation import labelled_map

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(300), 10)
    x = rng.normal(size=(300, 16))[labels] + rng.normal(size=(3000, 16)) * 0.8
    whole = labelled_map(x, labels, max_queries=3000)
    sampled = labelled_map(x, labels, max_queries=400)
    assert 20 < whole < 95 and abs(sampled - whole) < 5, (whole, sampled)
    # a set of up to max_queries: every descriptor queries, the sample changes nothing
    assert labelled_map(x[:500], labels[:500], max_queries=500) == \
        labelled_map(x[:500], labels[:500], max_queries=500, seed=9)
    assert labelled_map(x[:500], labels[:500], max_queries=499) != \
        labelled_map(x[:500], labels[:500], max_queries=499, seed=9)

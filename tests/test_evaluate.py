"""The Revisited evaluation, the descriptor index and the pictures."""

import json
import os

import numpy as np
import pytest

from dplg_tf.retrieval import evaluation as evaluate
from dplg_tf.search import index
from dplg_tf.retrieval import pictures


# ------------------------------------------------------------- compute_map

def test_compute_ap_vector():
    assert evaluate.compute_ap([0, 2, 5], 3) == pytest.approx(0.677778, abs=1e-6)


def test_compute_map_vectors():
    ranks = np.array([[4, 2, 0, 1, 3], [0, 2, 4, 1, 3], [0, 1, 2, 3, 4]]).T
    gnd = [{"ok": [0, 1], "junk": [2]}, {"ok": [0, 4], "junk": []}, {"ok": [], "junk": []}]
    m, aps, pr, prs = evaluate.compute_map(ranks, gnd, kappas=(1, 2, 5))
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
    m, aps, pr, _ = evaluate.compute_map(ranks, gnd)
    np.testing.assert_allclose(aps[~np.isnan(aps)], want_ap, atol=1e-12)
    assert m == pytest.approx(np.mean(want_ap), abs=1e-12)
    np.testing.assert_allclose(pr, np.mean(want_pr, axis=0), atol=1e-12)


def test_perfect_and_reversed_rankings():
    gnd = [{"ok": [0, 1, 2], "junk": [3]}]
    best = np.array([[0, 1, 2, 3, 4, 5]]).T
    m, *_ = evaluate.compute_map(best, gnd)
    assert m == pytest.approx(1.0)
    junk_first = np.array([[3, 0, 1, 2, 4, 5]]).T  # junk ahead of positives costs nothing
    assert evaluate.compute_map(junk_first, gnd)[0] == pytest.approx(1.0)
    worst = np.array([[5, 4, 3, 2, 1, 0]]).T
    assert evaluate.compute_map(worst, gnd)[0] < 0.7


def test_rank_orders_by_inner_product():
    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.3, 0.0]], np.float32)
    assert evaluate.rank(q, db)[:, 0].tolist() == [1, 2, 0, 3]


def test_markdown_table_side_by_side():
    row = {"mAP": 10.0, "mP@1": 20.0}
    table = evaluate.markdown_table({"untrained": {"easy": row}, "trained": {"easy": row}})
    assert "| untrained | Easy | 10.00 | 20.00 |" in table
    assert "| trained | Easy | 10.00 | 20.00 |" in table


# ----------------------------------------------------------------- index

def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_index_round_trip_matches_brute_force(tmp_path):
    db, q = _unit(500, 64, 0), _unit(7, 64, 1)
    names = [f"img{i}" for i in range(500)]
    probe = _unit(1, 64, 2)[0]
    idx = index.DescriptorIndex(64, "exact", probe)
    idx.add(db[:300], names[:300])
    idx.add(db[300:], names[300:])  # incremental
    idx.save(str(tmp_path / "idx"))
    loaded = index.DescriptorIndex.load(str(tmp_path / "idx"))
    scores, ids = loaded.search(q, 10)
    brute = np.argsort(-(q @ db.T), axis=1)[:, :10]
    np.testing.assert_array_equal(ids, brute)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, brute, 1), atol=1e-5)
    assert [loaded.names[i] for i in ids[0][:3]] == [names[i] for i in brute[0][:3]]


@pytest.mark.parametrize("kind", ["pq", "hnsw", "ivfpq"])
def test_approximate_indexes_find_near_duplicates(tmp_path, kind):
    db = _unit(3000, 64, 3)
    noisy = db[:20] + 0.05 * _unit(20, 64, 4)
    idx = index.DescriptorIndex(64, kind, nlist=32, pq_m=16, nprobe=8)
    idx.add(db, [str(i) for i in range(3000)])
    idx.save(str(tmp_path / kind))
    loaded = index.DescriptorIndex.load(str(tmp_path / kind))
    _, ids = loaded.search(noisy, 5)
    assert np.mean(ids[:, 0] == np.arange(20)) >= 0.9


def test_pq_index_ranks_near_ties_and_its_refine_knob_works(tmp_path):
    # random vectors: the true top-20 are near-ties, so only a fine ranking finds them
    db, q = _unit(8000, 64, 11), _unit(10, 64, 12)
    truth = np.argsort(-(q @ db.T), axis=1)[:, :20]

    def recall(idx):
        ids = idx.search(q, 20)[1]
        return np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ids, truth)])

    idx = index.DescriptorIndex(64, "pq", refine=10)
    idx.add(db[:5000], [str(i) for i in range(5000)])
    idx.add(db[5000:], [str(i) for i in range(5000, 8000)])  # incremental
    assert recall(idx) >= 0.95
    idx.tune(refine=1)  # no re-ranking beyond top-k: the 4-bit codes alone
    assert recall(idx) < 0.8
    idx.save(str(tmp_path / "pq"))
    loaded = index.DescriptorIndex.load(str(tmp_path / "pq"))
    assert loaded.params["refine"] == 1 and len(loaded) == 8000
    assert recall(loaded) < 0.8
    loaded.tune(refine=10)
    scores, ids = loaded.search(q, 20)
    assert recall(loaded) >= 0.95
    # the scores of the re-ranked candidates are exact inner products
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, ids, 1), atol=1e-5)
    with pytest.raises(ValueError, match="refine must be at least 1"):
        loaded.tune(refine=0)


def test_index_refuses_another_model_or_dimension(tmp_path):
    probe = _unit(1, 32, 5)[0]
    idx = index.DescriptorIndex(32, "exact", probe)
    idx.add(_unit(10, 32, 6), [str(i) for i in range(10)])
    with pytest.raises(index.IndexMismatch, match="another model"):
        idx.check_probe(_unit(1, 32, 7)[0])
    idx.check_probe(probe + 1e-5)  # the same model, rounding aside
    with pytest.raises(index.IndexMismatch, match="16-d but the index holds 32-d"):
        idx.search(_unit(2, 16, 8))
    with pytest.raises(index.IndexMismatch, match="cannot go into a 32-d index"):
        idx.add(_unit(2, 16, 8), ["a", "b"])
    with pytest.raises(FileNotFoundError, match="not an index folder"):
        index.DescriptorIndex.load(str(tmp_path / "nothing"))


def test_index_and_search_commands_on_descriptor_files(tmp_path):
    import subprocess
    import sys

    db, q = _unit(50, 32, 9), _unit(3, 32, 10)
    np.savez(tmp_path / "db.npz", descriptors=db, names=np.array([f"d{i}" for i in range(50)]),
             probe=db[0])
    np.savez(tmp_path / "q.npz", descriptors=q, names=np.array(["q0", "q1", "q2"]), probe=db[0])
    np.savez(tmp_path / "other.npz", descriptors=q, probe=q[0])
    idx_dir = str(tmp_path / "idx")
    run = [sys.executable, "-m", "dplg_tf.cli.index", f"--index_dir={idx_dir}"]
    proc = subprocess.run(run + [f"--descriptors={tmp_path / 'db.npz'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = subprocess.run(run + [f"--descriptors={tmp_path / 'db.npz'}"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--append" in again.stderr
    search = [sys.executable, "-c", "from dplg_tf.cli.search import run_search; run_search()",
              f"--index_dir={idx_dir}", "--top_k=3"]
    out = tmp_path / "hits.json"
    proc = subprocess.run(search + [f"--descriptors={tmp_path / 'q.npz'}", f"--output={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(out.read_text())
    best = np.argsort(-(q @ db.T), axis=1)[:, 0]
    assert [h["results"][0]["name"] for h in hits] == [f"d{i}" for i in best]
    bad = subprocess.run(search + [f"--descriptors={tmp_path / 'other.npz'}"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "built with another model" in bad.stderr


def test_pq_index_through_the_commands(tmp_path):
    import subprocess
    import sys

    db, q = _unit(400, 32, 13), _unit(4, 32, 14)
    np.savez(tmp_path / "db.npz", descriptors=db)
    np.savez(tmp_path / "small.npz", descriptors=db[:100])
    np.savez(tmp_path / "q.npz", descriptors=q)
    run = [sys.executable, "-m", "dplg_tf.cli.index", "--kind=pq", "--allow_unverified"]
    small = subprocess.run(run + [f"--index_dir={tmp_path / 'small'}",
                                  f"--descriptors={tmp_path / 'small.npz'}"],
                           capture_output=True, text=True, timeout=120)
    assert small.returncode == 2 and "at least 256 descriptors" in small.stderr
    idx_dir = str(tmp_path / "idx")
    proc = subprocess.run(run + [f"--index_dir={idx_dir}", f"--descriptors={tmp_path / 'db.npz'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "400 descriptors (pq, 32-d)" in proc.stdout, proc.stderr
    search = [sys.executable, "-c", "from dplg_tf.cli.search import run_search; run_search()",
              f"--index_dir={idx_dir}", "--top_k=5", f"--descriptors={tmp_path / 'q.npz'}",
              "--allow_unverified"]
    out = tmp_path / "hits.json"
    proc = subprocess.run(search + ["--refine=50", f"--output={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = [[int(h["name"]) for h in r["results"]] for r in json.loads(out.read_text())]
    # re-ranking 250 candidates of 400 finds the exact top-5
    assert found == np.argsort(-(q @ db.T), axis=1)[:, :5].tolist()
    bad = subprocess.run(search + ["--refine=0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "refine must be at least 1" in bad.stderr


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
    overlay = pictures.attention_overlay(image, attention)
    assert overlay.shape == (64, 96, 3) and 0 <= overlay.min() and overlay.max() <= 1

"""The descriptor index on disk and the dplg-index / dplg-search commands."""

import json

import numpy as np
import pytest

from dplg_tf.search import index

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
    hits = json.loads(out.read_text())["results"]
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
    hits = json.loads(out.read_text())
    assert hits["search"]["rerank"] is False and hits["search"]["qe_k"] == 0
    found = [[int(h["name"]) for h in r["results"]] for r in hits["results"]]
    # re-ranking 250 candidates of 400 finds the exact top-5
    assert found == np.argsort(-(q @ db.T), axis=1)[:, :5].tolist()
    bad = subprocess.run(search + ["--refine=0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not an integer in the range [1, 1000]" in bad.stderr
    # --rerank: the shortlist of 100 re-ranked (refine 50 x 100 covers all 400: exact)
    from dplg_tf.retrieval import query

    proc = subprocess.run(search + ["--refine=50", "--rerank", "--rerank_m=100", "--rerank_k=5",
                                    f"--output={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(out.read_text())
    assert hits["search"]["rerank"] is True and hits["search"]["m"] == 100
    found = [[int(h["name"]) for h in r["results"]] for r in hits["results"]]
    want = query.run(q, db, query.Settings(rerank=True, rerank_params={"m": 100, "k": 5}), 5)
    assert found == want.ids.tolist()
    bad = subprocess.run(search + ["--rerank", "--rerank_m=5", "--rerank_k=9"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Re-ranking needs 1 <= k < m" in bad.stderr

"""open_descriptors, the one opener of descriptor sources: each kind read and
checked, and a source that cannot be tied to a model refused unless told."""

import os

import numpy as np
import pytest

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.storage import extraction
from dplg_tf.storage.descriptors import write_npz
from dplg_tf.storage.sources import open_descriptors

DIM = 4
PROBE = np.full(DIM, 0.5, np.float32)


def _rows(n=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _folder(tmp_path, rows):
    out = str(tmp_path / "out")
    names = [f"img{i}.jpg" for i in range(len(rows))]
    manifest = {"model": "m/1", "fingerprint": "f" * 64, "probe": PROBE.tolist(), "dim": DIM,
                "requested_scales": None, "scales": [0.5, 1.0], "limits": {},
                "shard_size": 3, "listing_sha256": extraction.listing_hash(names),
                "images": len(rows), "num_shards": -(-len(rows) // 3)}
    extraction.open_folder(out, manifest, names)
    for s in range(manifest["num_shards"]):
        part = slice(3 * s, 3 * s + 3)
        errors = [None if n != "img1.jpg" else ("too small", "too small: 8 px")
                  for n in names[part]]
        extraction.write_shard(out, s, names[part], rows[part], errors, manifest)
    return out, names


def test_an_npz_descriptor_file(tmp_path):
    rows = _rows()
    path = str(tmp_path / "d.npz")
    write_npz(path, [f"d{i}" for i in range(5)], rows, PROBE, [("bad.jpg", "not an image")])
    source = open_descriptors(path)
    assert source.kind == "npz" and source.names == [f"d{i}" for i in range(5)]
    np.testing.assert_allclose(source.rows, rows)
    np.testing.assert_allclose(source.probe, PROBE)
    assert source.errors == [("bad.jpg", "not an image")] and source.manifest is None


def test_an_npz_without_a_probe_only_when_unverified_is_allowed(tmp_path):
    path = str(tmp_path / "bare.npz")
    write_npz(path, ["a", "b"], _rows(2))
    with pytest.raises(UserError, match="no probe descriptor.*--allow_unverified"):
        open_descriptors(path)
    source = open_descriptors(path, allow_unverified=True)
    assert source.kind == "npz" and source.probe is None and source.names == ["a", "b"]


def test_an_npy_array_only_when_unverified_is_allowed(tmp_path):
    rows = _rows()
    path = str(tmp_path / "rows.npy")
    np.save(path, rows.astype(np.float64))
    with pytest.raises(UserError, match="no probe descriptor.*--allow_unverified"):
        open_descriptors(path)
    source = open_descriptors(path, allow_unverified=True)
    assert source.kind == "npy" and source.probe is None and source.rows.dtype == np.float32
    assert source.names == [str(i) for i in range(5)]
    np.testing.assert_allclose(source.rows, rows)
    # told apart by its contents, not its name
    other = str(tmp_path / "rows.bin")
    with open(other, "wb") as f:
        np.save(f, rows)
    assert open_descriptors(other, allow_unverified=True).kind == "npy"


@pytest.mark.parametrize("array, text", [
    (np.full((2, DIM), np.nan, np.float32), "NaN or infinite"),
    (np.ones(DIM, np.float32), "expected finite float descriptors"),
    (np.ones((2, DIM), np.int32), "expected finite float descriptors"),
    (np.array([[{"a": 1}]], dtype=object), "not a readable .npy array"),
])
def test_a_bad_npy_array_is_one_sentence(tmp_path, array, text):
    path = str(tmp_path / "bad.npy")
    np.save(path, array, allow_pickle=True)
    with pytest.raises(UserError, match=text):
        open_descriptors(path, allow_unverified=True)


def test_an_npy_whose_header_claims_more_than_the_file_holds_is_refused(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.ones((1000, DIM), np.float32))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="not a readable .npy array"):
        open_descriptors(str(path), allow_unverified=True)


def test_an_extraction_folder_read_now_or_later(tmp_path):
    rows = _rows(7)
    out, names = _folder(tmp_path, rows)
    source = open_descriptors(out)
    kept = [n != "img1.jpg" for n in names]
    assert source.kind == "folder" and source.names == [n for n, k in zip(names, kept) if k]
    np.testing.assert_allclose(source.rows, rows[kept])
    np.testing.assert_allclose(source.probe, PROBE)
    assert source.scales == [0.5, 1.0] and source.manifest["dim"] == DIM
    lazy = open_descriptors(out, rows=False)
    assert lazy.rows is None and lazy.names is None and lazy.scales == [0.5, 1.0]
    with pytest.raises(UserError, match="holds 4-d descriptors; expected 8-d"):
        lazy.read_rows(8)
    np.testing.assert_allclose(lazy.read_rows(DIM), rows[kept])


def test_an_unfinished_folder_and_a_missing_file_are_refused(tmp_path):
    out, _ = _folder(tmp_path, _rows(7))
    os.remove(extraction.shard_path(out, 2))
    with pytest.raises(UserError, match="1 of 3 shards are missing"):
        open_descriptors(out)
    with pytest.raises(InputNotFound, match="does not exist"):
        open_descriptors(str(tmp_path / "nothing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable descriptor file"):
        open_descriptors(str(tmp_path / "junk.npz"))


@pytest.mark.parametrize("kind", ["exact", "hnsw", "pq", "ivfpq"])
def test_an_index_folder_gives_the_descriptors_it_holds(tmp_path, kind):
    """Every index kind keeps its descriptors whole (pq and ivfpq in their
    exact re-ranking stage), so an index folder is a source like the others."""
    from dplg_tf.search.index import DescriptorIndex

    rows = np.random.default_rng(3).normal(size=(300, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    index = DescriptorIndex(16, kind, np.ones(16, np.float32), nlist=4, pq_m=4)
    names = [f"im{i}.jpg" for i in range(len(rows))]
    index.add(rows, names)
    folder = str(tmp_path / "idx")
    index.save(folder)
    source = open_descriptors(folder)
    assert source.kind == "index" and source.names == names
    np.testing.assert_allclose(source.rows, rows, atol=1e-6)
    np.testing.assert_array_equal(source.probe, np.ones(16, np.float32))


def test_an_index_built_with_dba_or_without_a_probe_is_refused(tmp_path):
    from dplg_tf.search.index import DescriptorIndex

    rows = _rows(6)
    augmented = DescriptorIndex(DIM, "exact", PROBE, dba_k=2)
    augmented.add(rows, [str(i) for i in range(6)])
    augmented.save(str(tmp_path / "dba"))
    with pytest.raises(UserError, match="built with DBA .* augmented vectors"):
        open_descriptors(str(tmp_path / "dba"))
    bare = DescriptorIndex(DIM, "exact")
    bare.add(rows, [str(i) for i in range(6)])
    bare.save(str(tmp_path / "bare"))
    with pytest.raises(UserError, match="carries no probe descriptor"):
        open_descriptors(str(tmp_path / "bare"))
    assert open_descriptors(str(tmp_path / "bare"), allow_unverified=True).rows.shape == (6, DIM)

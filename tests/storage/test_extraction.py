"""dplg-extract folders read back: every damage is one sentence, and a rerun
describes a damaged shard again instead of counting it as done."""

import json
import os

import numpy as np
import pytest

from dplg_tf.errors import UserError
from dplg_tf.storage import extraction

DIM = 8


def _folder(tmp_path, rows=None):
    out = str(tmp_path / "out")
    names = [f"img{i}.jpg" for i in range(7)]
    probe = (np.ones(DIM) / np.sqrt(DIM)).tolist()
    manifest = {"model": "m/1", "fingerprint": "f" * 64, "probe": probe, "dim": DIM,
                "requested_scales": None, "scales": [1.0], "limits": {}, "shard_size": 3,
                "listing_sha256": extraction.listing_hash(names), "images": 7, "num_shards": 3}
    extraction.open_folder(out, manifest, names)
    rows = np.random.default_rng(0).normal(size=(7, DIM)).astype(np.float32) if rows is None \
        else rows
    for s in range(3):
        part = slice(3 * s, 3 * s + 3)
        extraction.write_shard(out, s, names[part], rows[part], [None] * len(names[part]),
                               manifest)
    return out, manifest, names, rows


def _damage(out, manifest, names, how):
    shard = extraction.shard_path(out, 1)
    if how == "truncated":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[:len(data) // 2])
    elif how == "empty":
        open(shard, "wb").write(b"")
    elif how == "errors deleted":
        os.remove(extraction.shard_path(out, 1, "errors"))
    elif how == "another model":
        extraction.write_shard(out, 1, names[3:6], np.ones((3, DIM), np.float32), [None] * 3,
                               dict(manifest, fingerprint="0" * 64))
    elif how == "another dimension":
        extraction.write_shard(out, 1, names[3:6], np.ones((3, 4), np.float32), [None] * 3,
                               dict(manifest, dim=4))
    elif how == "rows missing":
        extraction.write_shard(out, 1, names[3:5], np.ones((2, DIM), np.float32), [None] * 2,
                               manifest)
    return shard


@pytest.mark.parametrize("how", ["truncated", "empty", "errors deleted", "another model",
                                 "another dimension", "rows missing"])
def test_a_damaged_shard_is_refused_on_read_and_redone_on_rerun(tmp_path, how):
    out, manifest, names, rows = _folder(tmp_path)
    shard = _damage(out, manifest, names, how)
    with pytest.raises(UserError, match=r"damaged .*rerun the same dplg-extract"):
        extraction.read_all(out, DIM)
    damaged = []
    done = extraction.done_shards(out, 3, extraction.read_manifest(out), damaged)
    assert done == {0, 2} and damaged[0][0] == shard and os.path.isfile(shard + ".damaged")


def test_nan_descriptors_in_a_shard_are_refused(tmp_path):
    rows = np.ones((7, DIM), np.float32)
    rows[4, 2] = np.nan
    out, *_ = _folder(tmp_path, rows)
    with pytest.raises(UserError, match="NaN or infinite"):
        extraction.read_all(out, DIM)


@pytest.mark.parametrize("edit", ["not json", "a list", "no probe", "num_shards 1e9",
                                  "probe of NaN", "huge dim", "images negative"])
def test_a_damaged_manifest_is_one_sentence(tmp_path, edit):
    out, manifest, *_ = _folder(tmp_path)
    path = os.path.join(out, "manifest.json")
    m = dict(manifest)
    text = None
    if edit == "not json":
        text = "{not json"
    elif edit == "a list":
        text = "[1, 2, 3]"
    elif edit == "no probe":
        m.pop("probe")
    elif edit == "num_shards 1e9":
        m["num_shards"] = 10 ** 9
    elif edit == "probe of NaN":
        m["probe"] = [float("nan")] * DIM
    elif edit == "huge dim":
        m["dim"] = 10 ** 6
    elif edit == "images negative":
        m["images"] = -1
    with open(path, "w") as f:
        f.write(text if text is not None else json.dumps(m).replace("NaN", "NaN"))
    with pytest.raises(UserError, match="manifest.json"):
        extraction.read_all(out, DIM)

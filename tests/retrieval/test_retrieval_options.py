"""Whitening in the SavedModel, dplg-whiten, alpha-QE / DBA in the commands,
and the extractor's aspect-preserving minimum size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import image_bytes, small_dplg
from dplg_tf.export import export as export_lib
from dplg_tf.retrieval import whitening
from dplg_tf.storage import whitening as whitening_file
from dplg_tf.errors import UserError
from dplg_tf.search.index import DescriptorIndex

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")


def test_small_images_are_scaled_up_keeping_their_aspect():
    import tensorflow as tf

    from dplg_tf.export.signatures import DescriptorExtractor

    seen = []

    class Recorder:
        output = {"descriptor": tf.zeros([1, 4])}

        def __call__(self, images, training=False):
            seen.append(tuple(images.shape[1:3]))
            return {"descriptor": tf.ones([1, 4]), "attention": tf.ones([1, 2, 2])}

    extractor = DescriptorExtractor(Recorder(), [0.25, 1.0], min_scaled_side=64)
    extractor.describe_image(tf.zeros([80, 400, 3], tf.uint8))
    # 0.25 would give 20 x 100: the short side is brought to 64, the long one with it
    assert seen == [(64, 320), (80, 400)]


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models") / "plain")
    model = small_dplg(3)
    export_lib.export(model, base, version=1, scales=[1.0])
    return model, base


@pytest.mark.slow
def test_whitening_in_both_signatures_and_refused_for_another_model(plain_export, tmp_path,
                                                                    train_shards):
    import tensorflow as tf

    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.cli.whiten import learn

    model, base = plain_export
    describer = Describer(model=base)
    mean, projection, meta = learn(describer, train_shards + "/train-*", "supervised", 32,
                                   progress=False)
    assert meta["output_dim"] == 32 and meta["classes"] == 6 and meta["images"] > 50
    path = str(tmp_path / "w.npz")
    whitening_file.save(path, mean, projection, **meta)
    out = export_lib.export(model, str(tmp_path / "white"), version=1, scales=[1.0],
                            whitening=path)
    loaded = tf.saved_model.load(out)
    blobs = [image_bytes(90, 120, seed=s) for s in range(3)]
    raw = describer.describe_bytes(blobs)
    white = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))[
        "global_descriptor"].numpy()
    assert white.shape == (3, 32)
    # the signature (what GetModelMetadata shows) declares the whitened dimension
    declared = loaded.signatures["serving_default"].structured_outputs["global_descriptor"]
    assert declared.shape.as_list() == [None, 32]
    np.testing.assert_allclose(white, whitening.apply(raw, mean, projection), atol=2e-5)
    image = tf.io.decode_jpeg(blobs[0], channels=3)
    ms = loaded.signatures["multiscale"](image=image, scales=tf.constant([1.0]))
    np.testing.assert_allclose(ms["global_descriptor"].numpy(), white[0], atol=2e-5)
    assert ms["scale_descriptors"].shape == (1, 32)
    with pytest.raises(UserError, match="learned on another model"):
        export_lib.export(small_dplg(4), str(tmp_path / "other"), version=1, scales=[1.0],
                          whitening=path)


@pytest.mark.slow
def test_whiten_and_export_commands(plain_export, tmp_path, train_shards):
    model, base = plain_export
    out = str(tmp_path / "w.npz")
    proc = subprocess.run([sys.executable, "-m", "dplg_tf.cli.whiten", f"--model={base}",
                           f"--records={train_shards}/train-*", f"--output={out}",
                           "--kind=pca", "--dim=16", "--max_images=40", "--force"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pca whitening 512 -> 16 learned on 40 images" in proc.stdout
    # the held-out table: raw, then the four shrinkages tried at dim 16, one chosen
    assert "held-out classes (0.2 of the classes), mAP: raw" in proc.stdout
    assert proc.stdout.count("pca dim 16, shrinkage") == 4 and "<- chosen" in proc.stdout
    meta = whitening_file.load(out)[2]["held_out"]
    assert len(meta["table"]) == 4 and meta["raw_map"] > 0
    # measured on other records instead (here the validation shards)
    proc = subprocess.run([sys.executable, "-m", "dplg_tf.cli.whiten", f"--model={base}",
                           f"--records={train_shards}/train-*", f"--output={out}",
                           "--kind=supervised", "--dim=16", "--force",
                           f"--holdout_records={train_shards}/validation-*"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"held-out classes (the records of {train_shards}/validation-*)" in proc.stdout
    assert whitening_file.load(out)[2]["held_out"]["records"].endswith("validation-*")
    assert whitening_file.load(out)[1].shape == (16, 512)
    bad = subprocess.run([sys.executable, "-m", "dplg_tf.cli.whiten", f"--model={base}",
                          f"--records={tmp_path}/none-*", f"--output={out}"],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert bad.returncode == 2 and "No TFRecord shards match" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_index_dba_is_kept_for_appends_and_search_qe(tmp_path):
    from dplg_tf.retrieval import expansion

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = DescriptorIndex(8, "exact", dba_k=3, dba_alpha=1.0)
    index.add(x[:40], [f"a{i}" for i in range(40)])
    np.testing.assert_allclose(index.vectors(np.arange(40)), expansion.dba(x[:40], 3, 1.0),
                               atol=1e-6)
    index.save(str(tmp_path / "idx"))
    again = DescriptorIndex.load(str(tmp_path / "idx"))
    assert again.params["dba_k"] == 3 and again.params["dba_alpha"] == 1.0
    again.add(x[40:], [f"b{i}" for i in range(20)])
    stored = again.vectors(np.arange(40, 60))
    # each appended vector: itself and its neighbours among the index and the batch
    pool = np.concatenate([index.vectors(np.arange(40)), x[40:]])
    sims = x[40:] @ pool.T
    top = np.argsort(-sims, axis=1)[:, :3]
    w = np.take_along_axis(sims, top, 1)
    want = np.einsum("nk,nkd->nd", np.maximum(w, 0), pool[top])
    np.testing.assert_allclose(stored, want / np.linalg.norm(want, axis=1, keepdims=True),
                               atol=1e-5)
    q = x[:2] + 0.01
    expanded = expansion.alpha_qe(q, k=2, alpha=3.0,
                                  neighbours=expansion.index_neighbours(again))
    np.testing.assert_allclose(expanded, expansion.alpha_qe(q, again.vectors(np.arange(60)),
                                                            k=2, alpha=3.0), atol=1e-6)


def test_qe_and_dba_flags_through_the_commands(tmp_path):
    from dplg_tf.storage.descriptors import write_npz

    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    probe = np.ones(8, np.float32) / np.sqrt(8)
    write_npz(str(tmp_path / "d.npz"), [f"img{i}" for i in range(30)], x, probe)
    idx = str(tmp_path / "idx")
    run = subprocess.run([sys.executable, "-m", "dplg_tf.cli.index", f"--index_dir={idx}",
                          f"--descriptors={tmp_path}/d.npz", "--dba_k=2"],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.load(open(os.path.join(idx, open(os.path.join(idx, "CURRENT")).read().strip(),
                                       "meta.json")))["params"]["dba_k"] == 2
    again = subprocess.run([sys.executable, "-m", "dplg_tf.cli.index", f"--index_dir={idx}",
                            f"--descriptors={tmp_path}/d.npz", "--append", "--dba_k=5"],
                           capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 2 and "leave --dba_k out" in again.stderr
    search = subprocess.run([sys.executable, "-m", "dplg_tf.cli.search", f"--index_dir={idx}",
                             f"--descriptors={tmp_path}/d.npz", "--qe_k=2", "--top_k=1",
                             f"--output={tmp_path}/hits.json"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert search.returncode == 0, search.stderr[-2000:]
    hits = json.load(open(tmp_path / "hits.json"))
    assert hits["search"]["qe_k"] == 2 and hits["search"]["rerank"] is False
    assert "search: qe_k=2, qe_alpha=3.0, dba_k=0, rerank=False" in search.stdout
    hits = hits["results"]
    assert sum(h["results"][0]["name"] == h["query"] for h in hits) >= 28


def test_fusion_diagnostics_of_the_heads():
    from dplg_tf import config as config_lib
    from dplg_tf.training.diagnostics import attention_entropy, fusion_probe, fusion_stats
    from dplg_tf.nn.model import build_dplg

    uniform, peaked = np.ones((4, 4)), np.zeros((4, 4))
    peaked[1, 2] = 1.0
    np.testing.assert_allclose(attention_entropy(np.stack([uniform, peaked])), [1.0, 0.0],
                               atol=1e-9)
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    c = config_lib.base_config()
    c.model.backbone, c.model.local_dim = "small", 16
    for head, fused in (("dplg", True), ("no_fusion", True), ("gem", False), ("dolg", False)):
        c.model.head = head
        probe = fusion_probe(build_dplg(c))
        assert (probe is not None) == fused, head
        if probe is not None:
            stats = fusion_stats(probe, images)
            assert 0.0 < stats["attention_entropy"] <= 1.0 + 1e-6, (head, stats)
            assert stats["local_to_global_norm"] > 0.0, (head, stats)


@pytest.mark.slow
def test_whiten_refuses_a_dimension_above_the_descriptors_before_learning(plain_export,
                                                                         train_shards, tmp_path):
    _, base = plain_export
    for extra, words in [(["--dim=1024"], "must lie in 1..512"),
                         ([f"--holdout_records={tmp_path}/none-*"], "No TFRecord shards match")]:
        proc = subprocess.run([sys.executable, "-m", "dplg_tf.cli.whiten", f"--model={base}",
                               f"--records={train_shards}/train-*", "--max_images=20",
                               f"--output={tmp_path / 'w.npz'}", *extra],
                              capture_output=True, text=True, timeout=600, env=ENV)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "w.npz").exists()

"""Extraction-time refinements (scale aggregation, regional GeM, GeM+): each
against a NumPy reference, and the SavedModel against the Keras model plus
the NumPy post-processing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import image_bytes, small_dplg
from dplg_tf.errors import UserError
from dplg_tf.export import export as export_lib
from dplg_tf.export.refinements import Refinements, refined, trained_gem_p

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")


def regional_gem_reference(x, p, size):
    """(x + window Lp-mean of x) / 2, the window cut to the map, loop by loop."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    half = size // 2
    _, h, w, _ = x.shape
    for i in range(h):
        for j in range(w):
            window = np.maximum(x[:, max(0, i - half):i + half + 1,
                                  max(0, j - half):j + half + 1, :], 1e-6)
            out[:, i, j, :] = 0.5 * x[:, i, j, :] + 0.5 * np.mean(
                window ** p, axis=(1, 2)) ** (1.0 / p)
    return out


def gem_reference(x, p):
    return np.mean(np.maximum(np.asarray(x, np.float64), 1e-6) ** p, axis=(1, 2)) ** (1 / p)


@pytest.mark.parametrize("p,size,shape", [(2.5, 5, (2, 6, 7, 3)), (3.0, 3, (1, 2, 2, 4)),
                                          (1.0, 1, (1, 3, 5, 2)), (8.0, 3, (1, 4, 4, 2))])
def test_regional_gem_matches_numpy(p, size, shape):
    from dplg_tf.nn.layers import RegionalGeM

    x = np.random.default_rng(0).gamma(1.0, 2.0, shape).astype(np.float32)
    x[0, 0, 0, 0] = 0.0   # a ReLU zero
    got = RegionalGeM(p, size)(x).numpy()
    np.testing.assert_allclose(got, regional_gem_reference(x, p, size), rtol=1e-5, atol=1e-6)


def test_gem_power_matches_numpy():
    from dplg_tf.nn.layers import GeM

    x = np.random.default_rng(1).gamma(1.0, 2.0, (2, 5, 6, 8)).astype(np.float32)
    for p in (1.0, 3.0, 4.6, 10.0):
        np.testing.assert_allclose(GeM(p=p)(x).numpy(), gem_reference(x, p), rtol=1e-5)


def _gem_head_model(seed=0):
    import keras

    from conftest import config_lib
    from dplg_tf.nn.model import build_dplg

    keras.utils.set_random_seed(seed)
    c = config_lib.base_config()
    c.model.backbone, c.model.head, c.model.local_dim = "small", "gem", 32
    return build_dplg(c)


def _x5(model, image):
    import keras

    tap = keras.Model(model.input, model.get_layer("global_gem").input)
    return tap(image[None].astype(np.float32)).numpy()


@pytest.mark.slow
def test_savedmodel_with_regional_gem_and_gem_plus_equals_keras_plus_numpy(tmp_path):
    """gem head: descriptor = normalise(FC(GeM_p(RegionalGeM(X5)))); X5 from the
    Keras model, the rest in NumPy, against the exported SavedModel."""
    import tensorflow as tf

    model = _gem_head_model()
    image = np.random.default_rng(2).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    fc = model.get_layer("descriptor_fc")
    kernel, bias = (w.numpy().astype(np.float64) for w in fc.weights)
    x5 = _x5(model, image)
    for r in (Refinements(regional_gem=True), Refinements(gem_p=4.6),
              Refinements(regional_gem=True, regional_p=3.0, regional_size=3, gem_p=6.0)):
        pooled = regional_gem_reference(x5, r.regional_p, r.regional_size) \
            if r.regional_gem else x5
        f = gem_reference(pooled, r.gem_p or trained_gem_p(model)) @ kernel + bias
        want = f[0] / np.linalg.norm(f[0])
        path = export_lib.export(model, str(tmp_path / "m"), scales=[1.0], refinements=r)
        loaded = tf.saved_model.load(path)
        got = loaded.signatures["multiscale"](image=tf.constant(image),
                                              scales=tf.constant([1.0]))
        np.testing.assert_allclose(got["global_descriptor"].numpy(), want, atol=1e-5)
        assert json.loads(loaded.refinements.numpy().decode())["gem_p"] == r.gem_p


@pytest.mark.slow
def test_max_scale_aggregation_is_the_normalised_maximum(tmp_path):
    import tensorflow as tf

    from dplg_tf.retrieval.describers import Describer

    model = small_dplg(1)
    scales = [0.7071, 1.0, 1.4142]
    plain = export_lib.export(model, str(tmp_path / "plain"), scales=scales)
    maxed = export_lib.export(model, str(tmp_path / "max"), scales=scales,
                              refinements=Refinements(scale_aggregation="max"))
    image = tf.io.decode_jpeg(image_bytes(100, 140, seed=3), channels=3)
    a = tf.saved_model.load(plain).signatures["multiscale"](image=image,
                                                             scales=tf.constant(scales))
    b = tf.saved_model.load(maxed).signatures["multiscale"](image=image,
                                                             scales=tf.constant(scales))
    per_scale = a["scale_descriptors"].numpy()
    np.testing.assert_allclose(b["scale_descriptors"].numpy(), per_scale, atol=1e-6)
    want = per_scale.max(0) / np.linalg.norm(per_scale.max(0))
    np.testing.assert_allclose(b["global_descriptor"].numpy(), want, atol=1e-5)
    mean = per_scale.mean(0) / np.linalg.norm(per_scale.mean(0))
    np.testing.assert_allclose(a["global_descriptor"].numpy(), mean, atol=1e-5)
    # recorded, and the probe tells the two apart (their files never mix)
    d_plain, d_max = Describer(model=plain), Describer(model=maxed)
    assert d_max.refinements["scale_aggregation"] == "max"
    assert d_plain.refinements == {"scale_aggregation": "mean", "gem_p": None,
                                   "regional_gem": False}
    from dplg_tf.storage.descriptors import same_probe

    assert not same_probe(d_plain.probe(), d_max.probe())


@pytest.mark.slow
def test_refined_dplg_head_shares_the_weights_and_pools_as_numpy(tmp_path):
    import keras

    model = small_dplg(2)
    r = Refinements(regional_gem=True, regional_size=3, gem_p=5.0)
    refined_model = refined(model, r)
    assert refined(model, Refinements()) is model
    assert refined_model.get_layer("rfb") is model.get_layer("rfb")
    image = np.random.default_rng(4).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    x5 = _x5(model, image)
    tap = keras.Model(refined_model.input, refined_model.get_layer("global_gem").output)
    np.testing.assert_allclose(tap(image[None].astype(np.float32)).numpy(),
                               gem_reference(regional_gem_reference(x5, 2.5, 3), 5.0),
                               rtol=1e-4, atol=1e-6)
    # the SavedModel (weights frozen into the graph) equals the refined Keras model
    import tensorflow as tf

    path = export_lib.export(model, str(tmp_path / "m"), scales=[1.0], refinements=r)
    got = tf.saved_model.load(path).signatures["multiscale"](
        image=tf.constant(image), scales=tf.constant([1.0]))["global_descriptor"].numpy()
    want = refined_model(image[None].astype(np.float32))["descriptor"].numpy()[0]
    np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-5)


def test_bad_refinements_are_one_sentence():
    for kwargs, words in [({"scale_aggregation": "median"}, "unknown"),
                          ({"regional_p": 0.0}, "Regional GeM"),
                          ({"regional_size": 40}, "Regional GeM"),
                          ({"gem_p": float("inf")}, "GeM power")]:
        with pytest.raises(UserError, match=words):
            Refinements(**kwargs)


@pytest.mark.slow
def test_gem_p_auto_chooses_on_the_records_and_the_export_command(tmp_path, train_shards):
    from dplg_tf.retrieval.gem_plus import choose_gem_p

    model = small_dplg(5)
    best, table = choose_gem_p(model, train_shards + "/train-*", [1.0], 256, 64,
                               grid=(1.0, 6.0), max_images=40, progress=False)
    assert [p for p, _ in table] and sorted(p for p, _ in table) == [1.0, 3.0, 6.0]
    assert best == table[0][0] and table[0][1] == max(s for _, s in table)
    assert all(0 < s <= 100 for _, s in table)
    keras_file = str(tmp_path / "m.keras")
    model.save(keras_file)
    run = [sys.executable, "-m", "dplg_tf.cli.export", f"--keras_model={keras_file}",
           f"--output_dir={tmp_path / 'out'}", "--scales=1.0"]
    proc = subprocess.run(run + ["--gem_p=auto", f"--gem_p_records={train_shards}/train-*",
                                 "--gem_p_images=24", "--regional_gem"],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<- chosen" in proc.stderr and proc.stdout.strip().endswith("/1")
    for flag, words in [("--gem_p=lots", "must be a number or auto"),
                        ("--gem_p=nan", "The GeM power must be in (0, 100]"),
                        ("--gem_p=auto", "needs --gem_p_records")]:
        bad = subprocess.run(run + [flag], capture_output=True, text=True, timeout=600, env=ENV)
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr

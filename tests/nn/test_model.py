"""The assembled model: heads, shapes, gradients, serialisation, configs."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from dplg_tf.nn import backbones
from dplg_tf import config as config_lib
from dplg_tf.nn import costs
from dplg_tf.nn import layers
from dplg_tf.nn.heads import HEADS
from dplg_tf.nn.model import build_dplg, build_training_model, validate

RNG = np.random.default_rng(1)


def _images(b, h, w):
    return RNG.uniform(0, 255, (b, h, w, 3)).astype("float32")


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (130, 70)])
def test_shapes_for_non_square_inputs(small_config, head, hw):
    small_config.model.head = head
    model = build_dplg(small_config)
    out = model(_images(2, *hw))
    h4, w4 = -(-hw[0] // 16), -(-hw[1] // 16)
    assert out["descriptor"].shape == (2, 512)
    assert out["attention"].shape == (2, h4, w4)
    np.testing.assert_allclose(np.linalg.norm(out["descriptor"], axis=1), 1.0, rtol=1e-5)
    a = out["attention"].numpy()
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.sum(axis=(1, 2)), 1.0, rtol=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_every_trainable_weight_gets_a_gradient(small_config, head):
    small_config.model.head = head
    small_config.model.gem_trainable = True
    model = build_training_model(small_config)
    images = tf.constant(_images(4, 64, 96))
    labels = tf.constant([0, 3, 5, 6])
    with tf.GradientTape() as tape:
        out = model([images, labels], training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, out["logits"]))
    weights = model.trainable_weights
    grads = tape.gradient(loss, weights)
    dead = [w.path for w, g in zip(weights, grads)
            if g is None or not np.any(np.asarray(g) != 0)]
    assert not dead, f"weights without gradient in head {head}: {dead}"
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_training_logits_differ_only_at_the_label(small_config):
    model = build_training_model(small_config)
    images, labels = _images(3, 64, 64), np.array([1, 4, 6])
    out = model([images, labels])
    logits, plain = out["logits"].numpy(), out["cosine_logits"].numpy()
    mask = np.zeros_like(logits, dtype=bool)
    mask[np.arange(3), labels] = True
    np.testing.assert_allclose(logits[~mask], plain[~mask], rtol=1e-6)
    assert np.all(logits[mask] < plain[mask])  # the margin lowers the target logit
    u = plain[mask] / 30.0
    np.testing.assert_allclose(logits[mask], 30.0 * np.cos(np.arccos(u) + 0.15), atol=1e-4)


def test_training_model_needs_a_class_count(small_config):
    small_config.loss.num_classes = 0
    with pytest.raises(ValueError, match="number of classes is unknown"):
        build_training_model(small_config)
    assert build_training_model(small_config, num_classes=3).get_layer(
        "arcface").num_classes == 3


@pytest.mark.parametrize("head", ["dplg", "dolg"])
def test_keras_save_load_round_trip(small_config, head, tmp_path):
    small_config.model.head = head
    model = build_training_model(small_config)
    images, labels = _images(2, 80, 112), np.array([2, 5])
    model([images, labels], training=True)  # move BatchNorm statistics
    before = model([images, labels])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    after = loaded([images, labels])
    for key in before:
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(before[key]))
    assert isinstance(loaded.get_layer("dplg").get_layer("fusion"),
                      (layers.DotProductFusion, layers.OrthogonalFusion))


def test_model_refuses_tiny_images(small_config):
    with pytest.raises(ValueError, match="at least 64 px"):
        build_dplg(small_config)(_images(1, 48, 100))


@pytest.mark.parametrize("field,value,message", [
    ("model.backbone", "vgg16", "backbone='vgg16' is unknown"),
    ("model.head", "attention", "head='attention' is unknown"),
    ("model.descriptor_dim", 0, "descriptor_dim must be a positive integer"),
    ("model.local_dim", -4, "local_dim must be a positive integer"),
    ("model.gem_p", 0.0, "gem_p must be > 0"),
    ("loss.arcface_margin", 3.0, "arcface_margin must lie in"),
    ("train.mixed_precision", "fp8", "mixed_precision='fp8' is unknown"),
    ("data.image_size", 32, "below config.model.min_image_size"),
])
def test_wrong_config_values_fail_at_build_time(small_config, field, value, message):
    section, key = field.split(".")
    small_config[section][key] = value
    with pytest.raises(ValueError, match=message):
        build_dplg(small_config)


def test_missing_weights_file_is_a_clear_error(small_config, tmp_path):
    small_config.model.backbone = "resnet50"
    small_config.model.backbone_weights = str(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dplg(small_config)
    small_config.model.backbone = "small"
    small_config.model.backbone_weights = "imagenet"
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_dplg(small_config)


def test_configs_directory_builds_and_matches_the_paper():
    import importlib.util

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    loaded = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(root, name))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name[:-3]] = validate(module.get_config())
    paper = loaded["dplg_r50_gldv2"]
    assert (paper.model.backbone, paper.model.head) == ("resnet50", "dplg")
    for name in ("dplg_r50_gldv2", "ablation_no_rfb", "ablation_no_fusion", "ablation_gem",
                 "ablation_dolg"):  # the recipe fine-tunes ImageNet weights
        assert loaded[name].model.backbone_weights == "imagenet", name
    assert paper.model.descriptor_dim == 512 and paper.data.image_size == 512
    assert paper.train.learning_rate == 0.03 and paper.train.lr_schedule == "cosine"
    assert paper.train.optimizer == "sgd" and paper.train.momentum == 0.9
    assert paper.loss.arcface_margin == 0.15 and paper.loss.arcface_scale == 30.0
    assert paper.loss.num_classes == 81313 and paper.train.epochs == 100
    np.testing.assert_allclose(paper.eval.scales,
                               [2 ** -1.5, 0.5, 2 ** -0.5, 1.0, 2 ** 0.5])
    heads = {loaded[f"ablation_{h}"].model.head for h in ("no_rfb", "no_fusion", "gem", "dolg")}
    assert heads == {"no_rfb", "no_fusion", "gem", "dolg"}
    assert loaded["demo_cpu"].model.backbone == "small"


def test_mixed_bfloat16_outputs_float32(small_config):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        out = build_dplg(small_config)(_images(1, 64, 64))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out["descriptor"].dtype == tf.float32 and out["attention"].dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(out["descriptor"]), 1.0, rtol=1e-3)


def test_mac_counter_on_known_layers():
    inputs = keras.Input((None, None, 4))
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)               # 8*8*16*9*4
    x = keras.layers.Conv2D(8, 3, padding="same", dilation_rate=3)(x)    # 8*8*8*9*16
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5)(x)                                         # 8*5
    model = keras.Model(inputs, x)
    assert costs.count_macs(model, 8, 8, channels=4) == 8 * 8 * 16 * 9 * 4 + 8 * 8 * 8 * 9 * 16 + 8 * 5


def test_mac_counter_counts_the_fusion_matmuls(small_config):
    model = build_dplg(small_config)
    macs = costs.count_macs(model, 64, 64, scope_of=lambda n: n.split("/")[1])
    u, n = small_config.model.local_dim, 4 * 4
    # Q on the 1x1 global map, K and V over the H4 x W4 positions, 2 einsums
    assert macs["fusion_1"] == u * u + 2 * n * u * u + 2 * n * u


@pytest.mark.slow
def test_resnet50_at_512_gives_the_documented_outputs(caplog):
    c = config_lib.base_config()
    with caplog.at_level("WARNING"):
        model = build_dplg(c)
    assert "resnet50 starts from random weights" in caplog.text  # no silent random start
    out = model(_images(1, 512, 512))
    assert out["descriptor"].shape == (1, 512)
    assert out["attention"].shape == (1, 32, 32)
    np.testing.assert_allclose(np.linalg.norm(out["descriptor"]), 1.0, rtol=1e-5)
    tap4, tap5 = model.get_layer("resnet50").outputs
    assert tap4.shape[-1] == 1024 and tap5.shape[-1] == 2048


@pytest.mark.slow
def test_backbone_weights_from_a_local_h5_file(tmp_path):
    """A legacy-format .h5 of keras.applications (as the ImageNet notop file)
    is loaded into the backbone: a kernel of the built model equals the file's."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    source = keras.applications.ResNet50(include_top=False, weights=None,
                                         input_shape=(None, None, 3))
    kernel = source.get_layer("conv4_block6_3_conv").kernel
    kernel.assign(RNG.normal(size=kernel.shape).astype("float32"))
    path = str(tmp_path / "resnet50_notop.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    model, mode = backbones.build_backbone("resnet50", path)
    assert mode == "caffe"
    np.testing.assert_array_equal(
        model.get_layer("conv4_block6_3_conv").kernel.numpy(), kernel.numpy())


@pytest.mark.parametrize("head", HEADS)
def test_tf_checkpoint_round_trip_restores_every_variable(small_config, head, tmp_path):
    """The trainer's checkpoints (tf.train.Checkpoint) must hold every weight,
    the RFB's convolutions and BatchNorm statistics included."""
    small_config.model.head = head
    model = build_training_model(small_config)
    images, labels = _images(2, 64, 64), np.array([1, 2])
    model([images, labels], training=True)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    keras.utils.set_random_seed(123)
    fresh = build_training_model(small_config)
    tf.train.Checkpoint(model=fresh).restore(path).assert_existing_objects_matched()
    assert len(fresh.weights) == len(model.weights)
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    reader = tf.train.load_checkpoint(path)
    saved = [k for k in reader.get_variable_to_shape_map() if k.startswith("model/")]
    assert len(saved) >= len(model.weights)


@pytest.mark.parametrize("head", ["dplg", "dolg"])
def test_keras_files_written_before_the_layout_move_still_load(small_config, head, tmp_path):
    """A .keras file of the flat package named its layers' modules
    dplg_tf.layers and dplg_tf.model; such a file (made here by writing those
    names into a fresh file's config) loads in a new process and gives the
    same descriptors."""
    import json
    import subprocess
    import sys
    import zipfile

    small_config.model.head = head
    model = build_dplg(small_config)
    new, old = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(new)
    old_modules = {"dplg_tf.nn.model": "dplg_tf.model", "dplg_tf.nn.arcface": "dplg_tf.arcface"}

    def rename(node):
        if isinstance(node, dict):
            if str(node.get("module", "")).startswith("dplg_tf.nn"):
                node["module"] = old_modules.get(node["module"], "dplg_tf.layers")
            for value in node.values():
                rename(value)
        elif isinstance(node, list):
            for value in node:
                rename(value)

    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                rename(config)
                assert '"dplg_tf.layers"' in json.dumps(config)
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 128, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    code = ("import sys, numpy as np\n"
            "from dplg_tf.nn.model import load_model\n"
            "m = load_model(sys.argv[1])\n"
            "np.save(sys.argv[2], np.asarray(m(np.load(sys.argv[3]))['descriptor']))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(old), str(tmp_path / "out.npy"),
                           str(tmp_path / "images.npy")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               np.asarray(model(images)["descriptor"]), atol=1e-5)


def test_imagenet_weights_offline_are_one_sentence_naming_the_local_file(monkeypatch):
    """keras' failed download (a bare Exception 'URL fetch failure ...') becomes a
    UserError that says which .h5 to fetch and where to point the config."""
    from keras.src.utils import file_utils

    from dplg_tf.errors import UserError

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/w.h5: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(UserError, match=r"could not be downloaded .*"
                       r"resnet50_weights_tf_dim_ordering_tf_kernels_notop\.h5.*"
                       r"backbone_weights"):
        backbones.build_backbone("resnet50", "imagenet")

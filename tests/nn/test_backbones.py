"""The backbone registry: ResNet v1.5 and EfficientNet-Lite loading PyTorch weights by
name, checked against NumPy forwards written from the networks' definitions, the
converted ImageNet Lite0 classifying photos, preprocessing, the head that starts at the
backbone's own descriptor, and the off-the-shelf export."""

import os

import numpy as np
import pytest

import numpy_nets
import torch_files
from dplg_tf.errors import UserError
from dplg_tf.nn import backbones


def _resnet_state(seed=0, blocks=(3, 4, 6, 3)):
    """Random torchvision-named ResNet50 weights, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, o, i, k, gain=1.0):
        state[name] = (rng.normal(size=(o, i, k, k)) * gain * np.sqrt(2 / (i * k * k))
                       ).astype("<f4")

    def bn(name, c):
        state[f"{name}.weight"] = rng.uniform(0.5, 1.0, c).astype("<f4")
        state[f"{name}.bias"] = rng.normal(0, 0.1, c).astype("<f4")
        state[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype("<f4")
        state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype("<f4")
        state[f"{name}.num_batches_tracked"] = np.array(5, "<i8")

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    channels = 64
    for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(count):
            p = f"layer{stage}.{b}"
            conv(f"{p}.conv1.weight", width, channels, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2.weight", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3.weight", 4 * width, width, 1, gain=0.3)
            bn(f"{p}.bn3", 4 * width)
            if b == 0:
                conv(f"{p}.downsample.0.weight", 4 * width, channels, 1)
                bn(f"{p}.downsample.1", 4 * width)
            channels = 4 * width
    state["fc.weight"] = rng.normal(0, 0.01, (1000, 2048)).astype("<f4")
    state["fc.bias"] = np.zeros(1000, "<f4")
    return state


def _close(got, want, tol=1e-4):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
    assert err < tol, err


@pytest.mark.slow
def test_resnet50_v1_5_equals_numpy_forward_of_its_state_dict(tmp_path):
    state = _resnet_state()
    path = torch_files.write_zip(str(tmp_path / "r50.pth"), state)
    model, mode = backbones.build_backbone("resnet50_v1_5", path, include_top=True)
    assert mode == "torch"
    x = np.random.default_rng(1).uniform(-2, 2, (2, 67, 50, 3)).astype("float32")  # odd sizes
    x4, x5, logits = model(x)
    want4, want5, want_logits = numpy_nets.resnet_v1_5(state, x.astype(np.float64))
    assert x4.shape == (2, 5, 4, 1024) and x5.shape == (2, 3, 2, 2048)
    _close(x4, want4)
    _close(x5, want5)
    _close(logits, want_logits)


def _pycls_names(state, prefix):
    """torchvision names -> pycls (CVNet / SuperGlobal / DOLG), under `prefix`."""
    parts = {"conv1": "f.a", "bn1": "f.a_bn", "conv2": "f.b", "bn2": "f.b_bn",
             "conv3": "f.c", "bn3": "f.c_bn", "downsample.0": "proj", "downsample.1": "bn"}
    renamed = {}
    for key, value in state.items():
        if key.startswith("layer"):
            layer, block, rest = key.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            key = f"s{layer[5:]}.b{int(block) + 1}.{parts[module]}.{leaf}"
        else:
            key = key.replace("conv1.", "stem.conv.").replace("bn1.", "stem.bn.").replace(
                "fc.", "head.fc.")
        renamed[prefix + key] = value
    return renamed


@pytest.mark.slow
def test_pycls_names_and_prefixes_load_the_same_network(tmp_path):
    """A CVNet-style checkpoint: pycls names under encoder_q., inside model_state."""
    state = _resnet_state(seed=2)
    plain = torch_files.write_safetensors(str(tmp_path / "tv.safetensors"), state)
    pycls = torch_files.write_zip(str(tmp_path / "cvnet.pth"),
                                  _pycls_names(state, "encoder_q."), wrap="model_state")
    x = np.random.default_rng(3).uniform(-2, 2, (1, 64, 64, 3)).astype("float32")
    a, _ = backbones.build_backbone("resnet50_v1_5", plain)
    b, _ = backbones.build_backbone("resnet50_v1_5", pycls)
    for u, v in zip(a(x), b(x)):
        np.testing.assert_array_equal(u.numpy(), v.numpy())


def test_wrong_missing_and_unknown_keys_are_listed(tmp_path):
    state = _resnet_state(seed=4)
    state["conv1.weight"] = np.zeros((64, 3, 5, 5), "<f4")   # wrong shape
    del state["layer4.2.bn3.running_var"]                    # missing
    state["layer9.0.conv1.weight"] = np.zeros(3, "<f4")       # unknown
    path = torch_files.write_zip(str(tmp_path / "bad.pth"), state)
    with pytest.raises(UserError) as info:
        backbones.build_backbone("resnet50_v1_5", path)
    message = str(info.value)
    assert "conv1.weight (64, 3, 5, 5)" in message
    assert "layer4.2.bn3.running_var" in message and "layer9.0.conv1.weight" in message
    assert "\n" not in message


def test_weights_that_do_not_fit_the_backbone_are_refused(tmp_path):
    path = torch_files.write_zip(str(tmp_path / "r50.pth"), _resnet_state(seed=5))
    with pytest.raises(UserError, match="does not fit the efficientnet_lite0 backbone"):
        backbones.build_backbone("efficientnet_lite0", path)
    with pytest.raises(UserError, match="must be a Keras .h5 file"):
        backbones.build_backbone("resnet50", path)
    with pytest.raises(UserError, match="no ImageNet weights"):
        backbones.build_backbone("resnet50_v1_5", "imagenet")


def _lite_state(name):
    from dplg_tf.storage.checkpoints import read_state_dict

    return read_state_dict(backbones.lite_weights_file(name))


@pytest.mark.slow
def test_efficientnet_lite0_equals_numpy_forward_of_its_imagenet_weights():
    state = _lite_state("efficientnet_lite0")
    model, mode = backbones.build_backbone("efficientnet_lite0", "imagenet", include_top=True)
    assert mode == "lite"
    x = np.random.default_rng(0).uniform(-1, 1, (1, 70, 45, 3)).astype("float32")
    x4, x5, logits = model(x)
    want4, want5, want_logits = numpy_nets.efficientnet_lite(state, x.astype(np.float64))
    assert x4.shape == (1, 5, 3, 112) and x5.shape == (1, 3, 2, 1280)
    _close(x4, want4)
    _close(x5, want5)
    _close(logits, want_logits)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_sizes_take_their_package_weights(name):
    """Every tensor of the package finds its layer with its shape (depth and width rules)."""
    model, _ = backbones.build_backbone(name, "imagenet")
    assert model.outputs[0].shape[-1] == backbones.BACKBONES[name].widths[0]
    assert model.outputs[1].shape[-1] == 1280


def _photo(name):
    """A photo that scikit-image ships, resized to 256 on the short side, centre 224."""
    import skimage
    from PIL import Image

    image = Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name))
    image = image.convert("RGB")
    w, h = image.size
    s = 256 / min(w, h)
    image = image.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)


# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup;
# 665 moped, 670 motor scooter
@pytest.mark.slow
@pytest.mark.parametrize("photo,classes", [("chelsea.png", {281, 282, 285}),
                                           ("coffee.png", {967, 968}),
                                           ("motorcycle_left.png", {665, 670})])
def test_converted_lite0_names_the_photo_in_its_top5(photo, classes):
    from dplg_tf.nn.preprocessing import ImagePreprocessing

    model, mode = backbones.build_backbone("efficientnet_lite0", "imagenet", include_top=True)
    logits = model(ImagePreprocessing(mode)(_photo(photo)[None]))[2].numpy()[0]
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert classes & top5, top5
    assert int(np.argmax(logits)) in classes


def test_preprocessing_modes():
    from dplg_tf.nn.preprocessing import ImagePreprocessing

    x = np.array([[[[0.0, 127.0, 255.0]]]], np.float32)
    np.testing.assert_allclose(ImagePreprocessing("lite")(x).numpy().ravel(),
                               [-127 / 128, 0, 1], atol=1e-6)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(ImagePreprocessing("torch")(x).numpy().ravel(),
                               (x.ravel() / 255 - mean) / std, atol=1e-5)
    np.testing.assert_allclose(ImagePreprocessing("caffe")(x).numpy().ravel(),
                               [255 - 103.939, 127 - 116.779, 0 - 123.68], atol=1e-4)


def _config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@pytest.mark.slow
def test_identity_head_starts_at_the_backbone_descriptor():
    """finetune_cpu's untrained DPLG head gives exactly L2(GeM_3(X5)) of ImageNet Lite0."""
    from dplg_tf.nn.model import build_dplg

    model = build_dplg(_config(os.path.join(CONFIGS, "finetune_cpu.py")))
    x = np.random.default_rng(0).uniform(0, 255, (2, 96, 128, 3)).astype("float32")
    got = model(x)["descriptor"].numpy()
    backbone, _ = backbones.build_backbone("efficientnet_lite0", "imagenet")
    x5 = backbone((x - 127.0) / 128.0)[1].numpy().astype(np.float64)
    gem = np.mean(np.maximum(x5, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    want = gem / np.linalg.norm(gem, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_off_the_shelf_export_needs_no_training(tmp_path):
    """dplg-export of configs/pretrained_lite0.py: no --allow_random_init, preprocessing
    recorded, serving_default describes raw image bytes."""
    import subprocess
    import sys

    import tensorflow as tf

    from conftest import image_bytes

    out = tmp_path / "lite0"
    result = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.export",
         f"--config={os.path.join(CONFIGS, 'pretrained_lite0.py')}", f"--export_dir={out}",
         "--scales=1.0", "--max_image_side=128"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = tf.saved_model.load(str(out / "1"))
    assert loaded.preprocessing.numpy() == b"lite"
    d = loaded.signatures["serving_default"](
        image_bytes=tf.constant([image_bytes(96, 80, seed=1)]))["global_descriptor"].numpy()
    assert d.shape == (1, 1280)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)

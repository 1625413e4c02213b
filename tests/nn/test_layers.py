"""The layers held to the paper's equations, against NumPy references."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dplg_tf.nn import layers

RNG = np.random.default_rng(0)


def _np_gem(x, p, eps=1e-6):
    x = np.maximum(x.astype(np.float64), eps)
    return np.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


# ---------------------------------------------------------------- GeM (Eq. 1)

@pytest.mark.parametrize("p", [1.0, 3.0, 4.5])
def test_gem_matches_numpy(p):
    x = RNG.uniform(0.0, 4.0, (3, 5, 7, 6)).astype("float32")
    got = layers.GeM(p=p)(x).numpy()
    np.testing.assert_allclose(got, _np_gem(x, p), rtol=1e-5)


def test_gem_p1_is_mean_and_large_p_is_max():
    x = RNG.uniform(0.0, 50.0, (2, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(layers.GeM(p=1.0)(x).numpy(), x.mean(axis=(1, 2)), rtol=1e-5)
    # p = 500 overflows a naive float32 power (50 ** 500); GeM stays finite and
    # within (1/16) ** (1/500) of the maximum, the bound for 16 positions.
    got = layers.GeM(p=500.0)(x).numpy()
    mx = x.max(axis=(1, 2))
    assert np.all(np.isfinite(got))
    assert np.all(got <= mx * (1 + 1e-6))
    assert np.all(got >= mx * (1.0 / 16) ** (1.0 / 500) * (1 - 1e-6))


def test_gem_clips_negative_and_trainable_p_gets_gradient():
    x = RNG.normal(size=(2, 3, 3, 4)).astype("float32")
    gem = layers.GeM(p=3.0, trainable_p=True)
    np.testing.assert_allclose(gem(x).numpy(), _np_gem(x, 3.0), rtol=1e-5)
    assert [w.name for w in gem.trainable_weights] == ["p"]
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(gem(x))
    grad = tape.gradient(y, gem.trainable_weights)[0]
    assert np.isfinite(grad.numpy()) and grad.numpy() != 0.0
    assert layers.GeM(p=3.0).trainable_weights == []


# ---------------------------------------------- dot-product fusion (Eq. 2-3)

def _np_fusion(fusion, local, global_vec):
    def conv1x1(layer, x):
        kernel, bias = (w.numpy().astype(np.float64) for w in layer.weights)
        return x.astype(np.float64) @ kernel[0, 0] + bias

    b, h, w, c = local.shape
    q = conv1x1(fusion.query, global_vec)                         # (B, U)
    k = conv1x1(fusion.key, local.reshape(b, h * w, c))           # (B, N, U)
    v = conv1x1(fusion.value, local.reshape(b, h * w, c))
    logits = np.einsum("bu,bnu->bn", q, k) / math.sqrt(fusion.units)
    a = np.exp(logits - logits.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    return np.einsum("bn,bnu->bu", a, v), a.reshape(b, h, w)


def test_fusion_matches_numpy_eq2_eq3():
    local = RNG.normal(size=(2, 5, 3, 12)).astype("float32")
    global_vec = RNG.normal(size=(2, 9)).astype("float32")
    fusion = layers.DotProductFusion(units=16)
    vl, attention = fusion(local, global_vec)
    assert vl.shape == (2, 16) and attention.shape == (2, 5, 3)
    ref_vl, ref_a = _np_fusion(fusion, local, global_vec)
    np.testing.assert_allclose(attention.numpy(), ref_a, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(vl.numpy(), ref_vl, rtol=1e-4, atol=1e-5)


def test_attention_is_a_distribution():
    local = RNG.normal(scale=5.0, size=(4, 6, 7, 8)).astype("float32")
    global_vec = RNG.normal(scale=5.0, size=(4, 8)).astype("float32")
    _, attention = layers.DotProductFusion(units=8)(local, global_vec)
    a = attention.numpy()
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.sum(axis=(1, 2)), np.ones(4), rtol=1e-5)
    assert a.std() > 0  # not uniform: the map depends on the features


def test_permuting_positions_permutes_attention_and_keeps_vl():
    local = RNG.normal(size=(2, 4, 5, 6)).astype("float32")
    global_vec = RNG.normal(size=(2, 6)).astype("float32")
    fusion = layers.DotProductFusion(units=10)
    vl, a = fusion(local, global_vec)
    perm = RNG.permutation(20)
    shuffled = local.reshape(2, 20, 6)[:, perm].reshape(2, 4, 5, 6)
    vl_p, a_p = fusion(shuffled, global_vec)
    np.testing.assert_allclose(vl_p.numpy(), vl.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a_p.numpy().reshape(2, 20),
                               a.numpy().reshape(2, 20)[:, perm], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------ RFB

def test_rfb_structure_and_shape():
    rfb = layers.ReceptiveFieldBlock(filters=24, branch_filters=8)
    y = rfb(RNG.normal(size=(2, 9, 11, 16)).astype("float32"))
    assert y.shape == (2, 9, 11, 24)
    convs = {l.name: l for l in rfb._flatten_layers() if isinstance(l, keras.layers.Conv2D)}
    for i, (k, d) in enumerate(zip((1, 3, 5), (1, 3, 5))):
        assert convs[f"branch{i}_a_conv"].kernel_size == (k, k)
        assert convs[f"branch{i}_b_conv"].kernel_size == (3, 3)
        assert convs[f"branch{i}_b_conv"].dilation_rate == (d, d)
    assert convs["fuse_conv"].kernel.shape == (1, 1, 32, 24)
    assert np.all(y.numpy() >= 0)  # ReLU output


def test_rfb_gem_branch_is_spatially_constant():
    """Zeroing the conv branches leaves the GeM branch: the output is then the
    same at every position (the pooled vector broadcast back to H x W)."""
    rfb = layers.ReceptiveFieldBlock(filters=8, branch_filters=4, use_batchnorm=False)
    x = RNG.uniform(size=(1, 6, 6, 5)).astype("float32")
    rfb(x)
    for layer in rfb._flatten_layers():
        if isinstance(layer, keras.layers.Conv2D) and layer.name.startswith("branch"):
            layer.kernel.assign(np.zeros(layer.kernel.shape, "float32"))
            layer.bias.assign(np.zeros(layer.bias.shape, "float32"))
    y = rfb(x).numpy()
    np.testing.assert_allclose(y, np.broadcast_to(y[:, :1, :1], y.shape), atol=1e-6)


# --------------------------------------------------------------- DOLG fusion

def test_orthogonal_fusion_matches_numpy():
    local = RNG.normal(size=(2, 3, 4, 6)).astype("float32")
    g = RNG.normal(size=(2, 6)).astype("float32")
    fused, saliency = layers.OrthogonalFusion()(local, g)
    f = local.reshape(2, 12, 6).astype(np.float64)
    gg = g.astype(np.float64)[:, None, :]
    orth = f - (np.sum(f * gg, -1, keepdims=True) / np.sum(gg * gg, -1, keepdims=True)) * gg
    assert np.abs(np.sum(orth * gg, -1)).max() < 1e-9
    np.testing.assert_allclose(fused.numpy(), np.concatenate([g, orth.mean(1)], -1),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(saliency.numpy().sum(axis=(1, 2)), 1.0, rtol=1e-5)


# ------------------------------------------------------------ ArcFace (Eq. 4-5)

def _arcface_with_cosines(cosines, margin=0.15, scale=30.0):
    """An ArcFace layer whose proxies give exactly `cosines` for one embedding."""
    n = len(cosines)
    layer = layers.ArcFaceMargin(n, margin=margin, scale=scale)
    emb = np.zeros((1, n + 1), "float32")
    emb[0, 0] = 1.0
    proxies = np.zeros((n + 1, n), "float32")
    for j, u in enumerate(cosines):
        proxies[0, j] = u
        proxies[j + 1, j] = math.sqrt(max(0.0, 1 - u * u))
    layer.build((1, n + 1))
    layer.proxies.assign(proxies)
    return layer, emb


ANGLES = [0.0, 0.3, 1.0, math.pi / 2, 2.5, math.pi - 0.15]


@pytest.mark.parametrize("label", range(len(ANGLES)))
def test_arcface_logits_at_known_angles(label):
    u = np.cos(np.array(ANGLES, dtype=np.float64))
    layer, emb = _arcface_with_cosines(u.astype("float32"))
    plain = layer(emb).numpy()[0]
    np.testing.assert_allclose(plain, 30.0 * u, atol=2e-4)
    got = layer(emb, np.array([label])).numpy()[0]
    want = 30.0 * u
    want[label] = 30.0 * math.cos(math.acos(u[label]) + 0.15)
    np.testing.assert_allclose(got, want, atol=3e-4)


def test_arcface_beyond_pi_keeps_falling_and_is_continuous():
    m = 0.15
    thetas = np.linspace(math.pi - 0.4, math.pi, 41)
    layer = layers.ArcFaceMargin(2, margin=m)
    target = layer.margin_cosine(tf.constant(np.cos(thetas), tf.float32)).numpy()
    assert np.all(np.diff(target) < 0)  # a larger angle never scores higher
    below = thetas <= math.pi - m
    np.testing.assert_allclose(target[below], np.cos(thetas[below] + m), atol=1e-5)
    at = layer.margin_cosine(tf.constant([-math.cos(m)], tf.float32)).numpy()
    np.testing.assert_allclose(at, [-1.0], atol=1e-5)
    # the naive cos(theta + m) would rise again past pi - m
    assert np.cos(thetas[-1] + m) > np.cos(thetas[-5] + m)


@pytest.mark.parametrize("u", [1.0, -1.0])
def test_arcface_finite_gradients_at_unit_cosine(u):
    layer, emb = _arcface_with_cosines(np.array([u, 0.2], "float32"))
    emb = tf.constant(emb)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(emb)
        logits = layer(emb, tf.constant([0]))
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant([0]), logits))
    assert np.all(np.isfinite(logits.numpy()))
    for grad in [tape.gradient(loss, emb)] + tape.gradient(loss, layer.trainable_weights):
        assert np.all(np.isfinite(grad.numpy()))
    want = math.cos(math.acos(u) + 0.15) if u > 0 else u - (1 - math.cos(0.15))
    np.testing.assert_allclose(logits.numpy()[0, 0], 30.0 * want, atol=1e-4)


def test_arcface_normalises_embeddings_and_proxies():
    layer = layers.ArcFaceMargin(5, margin=0.15, scale=30.0)
    e = RNG.normal(size=(3, 8)).astype("float32")
    a = layer(e).numpy()
    b = layer(7.0 * e).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(a) <= 30.0 + 1e-4)


# ------------------------------------------------------------- serialisation

# every constructor argument set to a value other than its default
NON_DEFAULT_ARGUMENTS = {
    layers.GeM: dict(p=2.5, trainable_p=True, eps=1e-5),
    layers.ReceptiveFieldBlock: dict(filters=12, branch_filters=5, use_batchnorm=False,
                                     activation="gelu", gem_p=4.0),
    layers.DotProductFusion: dict(units=16, use_bias=False),
    layers.OrthogonalFusion: dict(eps=1e-4),
    layers.ArcFaceMargin: dict(num_classes=9, margin=0.2, scale=16.0),
    layers.ImagePreprocessing: dict(mode="unit"),
    layers.Whitening: dict(output_dim=3, eps=1e-9),
    layers.MinSizeCheck: dict(min_size=40),
    layers.UniformAttention: dict(),
    layers.RegionalGeM: dict(p=3.5, size=3, eps=1e-5),
}


def _layer_classes_in_the_source():
    """Names of every class in dplg_tf/ that subclasses a Keras Layer, found
    by reading the source (wherever it lives, imported or not)."""
    import ast
    import pathlib

    root = pathlib.Path(layers.__file__).resolve().parent.parent
    found = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(b).endswith(("layers.Layer", "Layer")) for b in node.bases):
                found.add(node.name)
    return found


def test_every_layer_of_the_package_is_in_the_round_trip_test():
    import keras

    assert _layer_classes_in_the_source() == {c.__name__ for c in NON_DEFAULT_ARGUMENTS}
    assert set(layers.__all__) == {c.__name__ for c in NON_DEFAULT_ARGUMENTS}
    for cls in NON_DEFAULT_ARGUMENTS:  # the names .keras files written before still use
        assert keras.saving.get_registered_name(cls) == f"dplg_tf>{cls.__name__}"


@pytest.mark.parametrize("cls", list(NON_DEFAULT_ARGUMENTS), ids=lambda c: c.__name__)
def test_layer_config_round_trip(cls):
    """Every constructor argument survives get_config -> from_config, checked
    against the arguments given (a field missing from get_config fails)."""
    import inspect

    args = NON_DEFAULT_ARGUMENTS[cls]
    params = [n for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "kwargs") and p.kind is not p.VAR_KEYWORD]
    assert sorted(params) == sorted(args)  # the table covers the whole signature
    layer = cls(**args, name="probe_layer")
    config = layer.get_config()
    for name, value in args.items():
        assert config[name] == value, name
    clone = cls.from_config(config)
    assert clone.name == "probe_layer"
    for name, value in args.items():
        assert clone.get_config()[name] == value, name


def test_whitening_layer_matches_numpy_and_survives_keras_save(tmp_path):
    import keras

    from dplg_tf.retrieval import whitening

    x = RNG.normal(size=(40, 6)).astype("float32")
    labels = np.repeat(np.arange(8), 5)
    mean, projection = whitening.learn_supervised(x, labels, 4)
    layer = layers.Whitening.from_arrays(mean, projection)
    out = np.asarray(layer(x))
    np.testing.assert_allclose(out, whitening.apply(x, mean, projection), rtol=1e-5, atol=1e-6)
    assert out.shape == (40, 4) and layer.trainable_weights == []
    inputs = keras.Input((6,))
    model = keras.Model(inputs, layer(inputs))
    model.save(tmp_path / "w.keras")
    again = keras.models.load_model(tmp_path / "w.keras")
    np.testing.assert_allclose(np.asarray(again(x)), out, rtol=1e-6)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="p > 0"):
        layers.GeM(p=0)
    with pytest.raises(ValueError, match="num_classes > 0"):
        layers.ArcFaceMargin(0)
    with pytest.raises(ValueError, match="margin"):
        layers.ArcFaceMargin(3, margin=2.0)
    with pytest.raises(ValueError, match="same width"):
        layers.OrthogonalFusion()(np.zeros((1, 2, 2, 4), "float32"),
                                  np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="Unknown preprocessing mode"):
        layers.ImagePreprocessing("bgr")
    with pytest.raises(ValueError, match="RegionalGeM needs"):
        layers.RegionalGeM(size=0)


# ------------------------------------------- Keras' own layer test helper

def _keras_layer_test(cls, init_kwargs, input_shape, output_shape, **expected):
    """keras.src.testing's run_layer_test: build, call, serialise, save, train
    and mixed precision, on a single-input layer (the fusions take two inputs,
    which it does not fit; they are tested against NumPy above)."""
    from keras.src import testing

    class Case(testing.TestCase):
        def runTest(self):
            self.run_layer_test(cls, init_kwargs, input_shape=input_shape,
                                expected_output_shape=output_shape, **expected)

    Case().runTest()


def test_keras_layer_helper_on_gem():
    _keras_layer_test(layers.GeM, dict(p=3.0), (2, 5, 5, 4), (2, 4),
                      expected_num_trainable_weights=0, expected_num_non_trainable_weights=1)
    _keras_layer_test(layers.GeM, dict(p=2.0, trainable_p=True), (2, 5, 5, 4), (2, 4),
                      expected_num_trainable_weights=1)


def test_keras_layer_helper_on_regional_gem():
    _keras_layer_test(layers.RegionalGeM, dict(p=2.5, size=3), (2, 5, 6, 4), (2, 5, 6, 4),
                      expected_num_trainable_weights=0, expected_num_non_trainable_weights=0)


def test_keras_layer_helper_on_the_rfb():
    _keras_layer_test(layers.ReceptiveFieldBlock, dict(filters=8), (2, 6, 6, 4), (2, 6, 6, 8))


def test_keras_layer_helper_on_preprocessing_whitening_and_checks():
    _keras_layer_test(layers.ImagePreprocessing, dict(mode="unit"), (2, 8, 8, 3), (2, 8, 8, 3),
                      run_training_check=False)
    _keras_layer_test(layers.Whitening, dict(output_dim=3), (4, 6), (4, 3),
                      expected_num_non_trainable_weights=2, run_training_check=False)
    _keras_layer_test(layers.UniformAttention, {}, (2, 4, 5, 3), (2, 4, 5),
                      run_training_check=False, run_mixed_precision_check=False)
    _keras_layer_test(layers.MinSizeCheck, dict(min_size=4), (2, 8, 8, 3), (2, 8, 8, 3),
                      run_training_check=False)


def test_keras_passes_training_on_to_the_batchnorms_inside_the_rfb():
    import keras

    x = RNG.random((2, 8, 8, 6)).astype("float32") * 5
    inp = keras.Input((None, None, 6))
    model = keras.Model(inp, layers.ReceptiveFieldBlock(8, name="rfb")(inp))
    bn = model.get_layer("rfb").branch0_a_bn
    before = np.array(bn.moving_mean)
    model(x, training=False)
    np.testing.assert_array_equal(np.array(bn.moving_mean), before)
    model(x, training=True)
    assert not np.allclose(np.array(bn.moving_mean), before)

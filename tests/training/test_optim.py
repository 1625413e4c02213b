"""Optimiser set-up of the trainer: schedule and weight-decay exclusions."""

import keras
import numpy as np
import pytest

from dplg_tf.nn import layers
from dplg_tf.nn.model import build_training_model
from dplg_tf.training.optim import learning_rate_schedule, make_optimizer, no_decay_variables


def test_cosine_schedule_with_warmup(small_config):
    t = small_config.train
    t.learning_rate, t.warmup_steps = 0.03, 10
    schedule = learning_rate_schedule(t, 110)
    lr = [float(schedule(s)) for s in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(lr, [0.0, 0.015, 0.03, 0.015, 0.0], atol=1e-6)
    t.warmup_steps = 0
    plain = learning_rate_schedule(t, 100)
    np.testing.assert_allclose([float(plain(0)), float(plain(50)), float(plain(100))],
                               [0.03, 0.015, 0.0], atol=1e-6)
    t.batch_size, t.lr_scaling, t.lr_base_batch = 256, "linear", 64   # 4x the batch, 4x lr
    np.testing.assert_allclose(float(learning_rate_schedule(t, 100)(0)), 0.12, atol=1e-6)


def test_weight_decay_skips_batchnorm_biases_and_gem_p(small_config):
    small_config.model.gem_trainable = True
    small_config.train.weight_decay = 1e-4
    model = build_training_model(small_config)
    optimizer = make_optimizer(small_config, model, 100)
    optimizer.build(model.trainable_variables)
    skipped = {id(v) for v in no_decay_variables(model)}
    decayed = [v for v in model.trainable_variables if id(v) not in skipped]
    gem_p = [v for v in model.trainable_variables if v.name == "p"]
    assert gem_p and all(id(v) in skipped for v in gem_p)
    for v in model.trainable_variables:
        assert optimizer._use_weight_decay(v) == (id(v) not in skipped), v.path
    names = {v.name for v in decayed}
    assert names == {"kernel", "proxies"}  # conv/dense kernels and ArcFace proxies only
    bn = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and all(id(v) in skipped for l in bn for v in l.trainable_variables)
    assert any(isinstance(l, layers.GeM) for l in model._flatten_layers())


def _one_step_deltas(config, mode, seed=0):
    """Variable changes of one trainer step (no momentum, no clipping) on a fixed batch."""
    import tensorflow as tf

    from dplg_tf.training.optim import build_train_step

    config.train.weight_decay_mode = mode
    config.train.momentum, config.train.clip_norm, config.train.warmup_steps = 0.0, 0.0, 0
    keras.utils.set_random_seed(seed)
    model = build_training_model(config)
    optimizer = make_optimizer(config, model, 1000)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    train_step = build_train_step(tf.distribute.get_strategy(), model, optimizer,
                                  config.train, 4, step)
    rng = np.random.default_rng(seed)
    batch = (tf.constant(rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32")),
             tf.constant(rng.integers(0, 7, 4).astype("int32")))
    before = [v.numpy().copy() for v in model.trainable_variables]
    train_step(iter([batch]))
    return model, before, [v.numpy() - b for v, b in zip(model.trainable_variables, before)]


def test_coupled_weight_decay_adds_wd_times_w_to_the_gradient(small_config):
    """Coupled: the update is -lr * (gradient + wd * w) on decayed variables and
    -lr * gradient on the others; decoupled Keras differs (it multiplies in
    after the update)."""
    from dplg_tf.training.optim import weight_decay_mode

    small_config.train.weight_decay, small_config.train.learning_rate = 0.05, 0.1
    lr = float(learning_rate_schedule(small_config.train, 1000)(0))
    model, before, coupled = _one_step_deltas(small_config, "coupled")
    small_config.train.weight_decay = 0.0
    _, _, plain = _one_step_deltas(small_config, "coupled")
    skipped = {id(v) for v in no_decay_variables(model)}
    checked = 0
    for v, w, dc, dp in zip(model.trainable_variables, before, coupled, plain):
        expected = dp - lr * 0.05 * w if id(v) not in skipped else dp
        np.testing.assert_allclose(dc, expected, atol=2e-6, err_msg=v.path)
        checked += id(v) not in skipped
    assert checked > 5
    small_config.train.weight_decay_mode = "l2"
    with pytest.raises(ValueError, match="weight_decay_mode='l2' is unknown"):
        weight_decay_mode(small_config.train)


# what a GPU user turns on first, and the all-reduce: each in a fresh process
# (the precision policy and the logical devices are set before TensorFlow starts)
OPTIONS_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from dplg_tf.config import base_config
from dplg_tf.nn.model import build_training_model
from dplg_tf.training.optim import build_train_step, freeze_batchnorm, make_optimizer

mode = sys.argv[1]
c = base_config()
c.model.backbone, c.model.local_dim, c.loss.num_classes, c.data.image_size = "small", 32, 5, 64
t = c.train
t.learning_rate, t.warmup_steps, t.weight_decay = 0.02, 0, 0.0
if mode.startswith("mixed"):
    t.mixed_precision = mode
    keras.mixed_precision.set_global_policy(mode)
t.jit_compile = mode == "jit_compile"
t.frozen_batchnorm = mode in ("frozen_batchnorm", "replicas")
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
labels = rng.integers(0, 5, 8).astype("int32")


def trained(devices, steps):
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = build_training_model(c, 5)
        if t.frozen_batchnorm:
            freeze_batchnorm(model)
        optimizer = make_optimizer(c, model, 100)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64)
    bn = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    stats = [np.array(l.moving_mean) for l in bn]
    model.initial = [v.numpy().copy() for v in model.trainable_variables]
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((images, labels)).repeat())
    train_step = build_train_step(strategy, model, optimizer, t, 8, step)
    it = iter(data)
    losses = [float(train_step(it)[0]) for _ in range(steps)]
    moved = any(not np.allclose(s, np.array(l.moving_mean)) for s, l in zip(stats, bn))
    return model, losses, moved


if mode == "replicas":  # one update: 2 replicas x 4 images against 1 replica x 8
    out = {}
    for clip in (1.0, 0.0):   # clipped by the global norm (active), and not clipped
        t.learning_rate, t.momentum, t.clip_norm = 0.5 if clip else 0.01, 0.9, clip
        one, _, _ = trained(["/cpu:0"], 1)
        two, _, _ = trained(["/cpu:0", "/cpu:1"], 1)
        d1 = [v.numpy() - w for v, w in zip(one.trainable_variables, one.initial)]
        d2 = [v.numpy() - w for v, w in zip(two.trainable_variables, two.initial)]
        out["clipped" if clip else "plain"] = {
            "same_start": max(float(np.max(np.abs(a - b))) for a, b in zip(one.initial, two.initial)),
            "update": max(float(np.max(np.abs(a))) for a in d1),
            "update_norm": float(np.sqrt(sum(np.sum(a * a) for a in d1))),
            "max_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(d1, d2))}
    print(json.dumps(out))
else:
    model, losses, moved = trained(["/cpu:0"], 8)
    fc = model.get_layer("dplg").get_layer("descriptor_fc")
    print(json.dumps({"losses": losses, "compute": fc.compute_dtype,
                      "variable": fc.kernel.dtype, "bn_moved": moved,
                      "descriptor": model.get_layer("dplg").output["descriptor"].dtype}))
"""


def _options_run(mode):
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", OPTIONS_SCRIPT, mode], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])



@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mixed_float16", "mixed_bfloat16", "jit_compile",
                                  "frozen_batchnorm"])
def test_each_gpu_option_trains_with_finite_falling_loss(mode):
    out = _options_run(mode)
    losses = out["losses"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    compute = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(mode, "float32")
    assert out["compute"] == compute and out["variable"] == "float32"
    assert out["descriptor"] == "float32"           # the descriptor stays float32
    assert out["bn_moved"] == (mode != "frozen_batchnorm")


@pytest.mark.slow
def test_one_update_on_two_replicas_equals_one_replica_on_the_same_global_batch():
    """The private all-reduce (the optimiser's own is skipped) and the clip by
    the all-reduced gradient's global norm give the 1-replica update."""
    runs = _options_run("replicas")
    for out in runs.values():
        assert out["same_start"] == 0.0 and out["update"] > 1e-4, runs
        assert out["max_diff"] < 1e-3 * out["update"], runs   # the same, to float precision
    # clipped to lr * clip_norm = 0.5 (the gradient's norm is larger); not clipped, a
    # wrong reduction (a mean of the replicas' halves) would be off by 2x
    assert runs["clipped"]["update_norm"] == pytest.approx(0.5, rel=1e-3)
    assert runs["plain"]["update_norm"] < 0.5


def _backbone_mask(model):
    from dplg_tf.training.optim import backbone_variables

    ids = {id(v) for v in backbone_variables(model)}
    return [id(v) in ids for v in model.trainable_variables]


def test_backbone_learning_rate_multiplier_and_frozen_steps(small_config):
    """Fine-tuning options: the backbone's update is multiplier x the plain one (plain
    SGD, no decay), the head's is unchanged; during frozen steps the backbone stays put."""
    small_config.train.weight_decay = 0.0
    model, _, plain = _one_step_deltas(small_config, "decoupled")
    mask = _backbone_mask(model)
    assert sum(mask) > 10 and not all(mask)
    small_config.train.backbone_lr_multiplier = 0.25
    _, _, slow = _one_step_deltas(small_config, "decoupled")
    def close(got, want):  # threaded CPU reductions differ from run to run in the 5th digit
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max() + 1e-12)

    for in_backbone, a, b in zip(mask, plain, slow):
        close(b, 0.25 * a if in_backbone else a)
    assert any(np.abs(a).max() > 0 for a, m in zip(plain, mask) if m)
    small_config.train.backbone_frozen_steps = 1
    _, _, frozen = _one_step_deltas(small_config, "decoupled")
    for in_backbone, a, b in zip(mask, plain, frozen):
        if in_backbone:
            assert np.abs(b).max() == 0.0
        else:
            close(b, a)


@pytest.mark.parametrize("field,value,words", [
    ("model.preprocessing", "bgr", "config.model.preprocessing"),
    ("model.head_init", "zeros", "config.model.head_init"),
    ("model.descriptor_dim", 0, "descriptor_dim 0, no final FC, only with head 'gem'"),
    ("train.backbone_lr_multiplier", -1.0, "backbone_lr_multiplier"),
    ("train.backbone_frozen_steps", -3, "backbone_frozen_steps")])
def test_fine_tuning_fields_are_checked(small_config, field, value, words):
    from dplg_tf.config import validate
    from dplg_tf.errors import UserError

    part, name = field.split(".")
    small_config[part][name] = value
    with pytest.raises(UserError, match=words):
        validate(small_config)

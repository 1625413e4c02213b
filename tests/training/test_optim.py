"""Optimiser set-up of the trainer: schedule and weight-decay exclusions."""

import keras
import numpy as np

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
    import pytest

    with pytest.raises(ValueError, match="weight_decay_mode='l2' is unknown"):
        weight_decay_mode(small_config.train)

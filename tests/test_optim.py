"""Optimiser set-up of the trainer: schedule and weight-decay exclusions."""

import keras
import numpy as np

from dplg_tf import layers
from dplg_tf.model import build_training_model
from dplg_tf.optim import learning_rate_schedule, make_optimizer, no_decay_variables


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

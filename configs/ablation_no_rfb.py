"""Ablation of the paper's recipe. Table 2, row 3: dot-product fusion without RFB (a 1x1 conv instead)."""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.backbone_weights = "imagenet"  # as the paper's recipe
    config.train.weight_decay_mode = "coupled"
    config.model.head = "no_rfb"
    return config

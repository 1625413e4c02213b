"""Ablation of the paper's recipe. Table 2, row 2: RFB without dot-product fusion (GeM of X'4 added to V'g)."""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.backbone_weights = "imagenet"  # as the paper's recipe
    config.train.weight_decay_mode = "coupled"
    config.model.head = "no_fusion"
    return config

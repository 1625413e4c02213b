"""Ablation of the paper's recipe. Comparison: DOLG's orthogonal fusion on the RFB-refined X4."""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.backbone_weights = "imagenet"  # as the paper's recipe
    config.train.weight_decay_mode = "coupled"
    config.model.head = "dolg"
    return config

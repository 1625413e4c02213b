"""Ablation of the paper's recipe. Comparison: DOLG's orthogonal fusion on the RFB-refined X4."""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.head = "dolg"
    return config

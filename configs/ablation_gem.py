"""Ablation of the paper's recipe. Table 2, row 1: neither RFB nor fusion, plain GeM (Radenovic et al.)."""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.backbone_weights = "imagenet"  # as the paper's recipe
    config.train.weight_decay_mode = "coupled"
    config.model.head = "gem"
    return config

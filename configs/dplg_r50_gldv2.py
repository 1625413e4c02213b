"""The paper's recipe (Hu & Bors, ICIP 2022, section 3.4).

ResNet50 + DPLG head, GLDv2-clean (81,313 classes), 512x512 crops, D=512,
SGD momentum 0.9, cosine decay from lr 0.03, ArcFace m=0.15 gamma=30,
at most 100 epochs, from ImageNet weights: "imagenet" lets keras download
them; give the path of a local notop .h5 file where there is no network
(--config.model.backbone_weights=/path/resnet50_notop.h5).
"""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.backbone_weights = "imagenet"
    config.train.weight_decay_mode = "coupled"  # PyTorch-style SGD, as DOLG trains
    return config

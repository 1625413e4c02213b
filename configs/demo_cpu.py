"""Small backbone and small images: trains in minutes on 2 CPU cores.

For the demo and tests on the synthetic landmarks. The number of classes is
read from the training data (loss.num_classes = 0).
"""

from dplg_tf.config import base_config


def get_config():
    config = base_config()
    config.model.backbone = "small"
    config.model.local_dim = 128
    config.loss.num_classes = 0
    config.data.image_size = 128
    config.data.crop_area_range = (0.3, 1.0)
    config.data.shuffle_buffer = 1000
    config.train.batch_size = 32
    config.train.epochs = 10
    config.train.learning_rate = 0.01
    config.train.warmup_steps = 20
    config.train.checkpoint_every = 100
    config.train.log_every = 10
    config.train.eval_every = 0
    config.train.eval_batches = 10
    config.eval.max_image_side = 256
    return config

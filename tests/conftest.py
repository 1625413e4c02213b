import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

from dplg_tf import config as config_lib  # noqa: E402


@pytest.fixture
def small_config():
    """The model of the CPU demo: small backbone, narrow head, 512-d descriptor."""
    c = config_lib.base_config()
    c.model.backbone = "small"
    c.model.local_dim = 32
    c.model.descriptor_dim = 512
    c.loss.num_classes = 7
    c.data.image_size = 64
    return c


def small_dplg(seed=0):
    """A seeded descriptor model with the small backbone (fast on CPU)."""
    import keras

    from dplg_tf.model import build_dplg

    keras.utils.set_random_seed(seed)
    c = config_lib.base_config()
    c.model.backbone = "small"
    c.model.local_dim = 32
    return build_dplg(c)

"""dplg_tf: DPLG (Hu & Bors, ICIP 2022) in Keras 3 / TensorFlow."""

__version__ = "0.1.0"

import os as _os

# TensorFlow's C++ start-up chatter hides our own output; users can override.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dplg_tf import config, layers, model  # noqa: E402,F401
from dplg_tf.model import build_dplg, build_training_model  # noqa: E402,F401

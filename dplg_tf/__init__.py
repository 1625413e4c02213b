"""dplg_tf: DPLG (Hu & Bors, ICIP 2022) in Keras 3 / TensorFlow.

Submodules load on first use (`dplg_tf.model`, `dplg_tf.layers`, ...), so
tools that need no TensorFlow (data generation, the client) start fast.
"""

import importlib
import os as _os

__version__ = "0.1.0"

# TensorFlow's C++ start-up chatter hides our own output; users can override.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_SUBMODULES = ("backbones", "config", "costs", "data", "evaluate", "export", "index",
               "layers", "model", "pictures", "serving", "train")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"dplg_tf.{name}")
    if name in ("build_dplg", "build_training_model"):
        return getattr(importlib.import_module("dplg_tf.model"), name)
    raise AttributeError(f"module 'dplg_tf' has no attribute {name!r}")

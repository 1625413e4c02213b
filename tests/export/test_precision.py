"""dplg-export --precision: the exported graph computes in bfloat16 / float16,
returns float32 descriptors close to the float32 export's, and records it."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import image_bytes, small_dplg
from dplg_tf.errors import UserError
from dplg_tf.export import export as export_lib
from dplg_tf.export.precision import in_precision

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")


def test_the_copy_computes_in_bfloat16_with_the_same_weights():
    model = small_dplg()
    copy = in_precision(model, "bfloat16")
    assert in_precision(model, "float32") is model
    policies = {layer.name: layer.dtype_policy.name for layer in copy.layers}
    assert policies["fusion"] == policies["descriptor_fc"] == "mixed_bfloat16"
    assert policies["preprocessing"] == policies["descriptor"] == "float32"
    inner = [layer for sub in copy.layers if hasattr(sub, "layers") for layer in sub.layers]
    assert any(layer.dtype_policy.name == "mixed_bfloat16" for layer in inner)  # the backbone
    for a, b in zip(model.weights, copy.weights):
        assert a.dtype == b.dtype == "float32"
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(UserError, match="--precision='int8' is unknown"):
        in_precision(model, "int8")


@pytest.mark.slow
def test_bfloat16_export_gives_float32_descriptors_near_the_float32_export(tmp_path):
    import tensorflow as tf

    model = small_dplg()
    blobs = [image_bytes(120 + 8 * i, 160, seed=i) for i in range(6)]
    out = {}
    for precision in ("float32", "bfloat16"):
        path = export_lib.export(model, str(tmp_path / precision), precision=precision)
        loaded = tf.saved_model.load(path)
        assert loaded.precision.numpy().decode() == precision
        got = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))
        out[precision] = got["global_descriptor"]
    assert out["bfloat16"].dtype == tf.float32
    a, b = out["float32"].numpy(), out["bfloat16"].numpy()
    assert not np.array_equal(a, b)   # it did compute in another precision
    cosine = np.sum(a * b, axis=1)
    assert cosine.min() >= 0.999, cosine
    path = export_lib.export(model, str(tmp_path / "f16"), scales=[1.0], precision="float16")
    assert tf.saved_model.load(path).precision.numpy() == b"float16"
    # the command's flag: a bad value is one sentence
    bad = subprocess.run([sys.executable, "-m", "dplg_tf.cli.export", "--config",
                          "configs/demo_cpu.py", "--allow_random_init", "--precision",
                          "int8", "--output_dir", str(tmp_path / "bad")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "precision" in bad.stderr

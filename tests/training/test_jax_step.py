"""The model trains on Keras' JAX backend too (keras.ops only): every head
takes ArcFace training steps under KERAS_BACKEND=jax on the CPU."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, math
import numpy as np
from dplg_tf.config import base_config
from dplg_tf.nn.heads import HEADS
from dplg_tf.training.jax_step import setup
import keras
out = {"backend": keras.backend.backend()}
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
labels = rng.integers(0, 5, 8).astype("int32")
for head in HEADS:
    c = base_config()
    c.model.backbone, c.model.local_dim, c.model.head = "small", 32, head
    c.train.learning_rate = 0.05
    keras.utils.set_random_seed(0)
    model, step, state = setup(c, 5)
    before = [np.array(v) for v in state[0]]
    losses = []
    for _ in range(4):
        loss, state = step(state, images, labels)
        losses.append(float(loss))
    moved = max(float(np.abs(np.array(a) - b).max()) for a, b in zip(state[0], before))
    out[head] = {"losses": losses, "moved": moved}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_head_trains_on_the_jax_backend():
    pytest.importorskip("jax")
    from dplg_tf.nn.heads import HEADS
    from dplg_tf.training.jax_step import backend_environment

    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=900, env=backend_environment())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax"
    for head in HEADS:
        losses = result[head]["losses"]
        assert all(v == v and abs(v) < 1e6 for v in losses), (head, losses)  # finite
        assert losses[-1] < 0.5 * losses[0], (head, losses)  # it learns the batch
        assert result[head]["moved"] > 0, head  # the update reached the weights

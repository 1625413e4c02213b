"""dplg-demo: build the model and describe a generated image.

Until the full pipeline lands (data -> train -> export -> serve -> search),
the demo builds the model of a config (the CPU demo config by default),
renders a procedural "landmark" image, and prints its descriptor, the
attention map over the image and what the model costs.
"""

import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from dplg_tf import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Model config file.")
flags.DEFINE_integer("height", 192, "Height of the generated image.")
flags.DEFINE_integer("width", 256, "Width of the generated image.")
flags.DEFINE_integer("seed", 0, "Seed of the generated image.")
flags.DEFINE_string("output", "", "Optional .npz file for the image, descriptor and attention.")
FLAGS = flags.FLAGS

_SHADES = " .:-=+*#%@"


def generated_image(height, width, seed=0):
    """A textured facade (windows on a wall) over a noisy sky, uint8 RGB."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    sky = np.linspace(200, 120, height)[:, None, None] * np.array([0.7, 0.85, 1.0])
    img[:] = sky + rng.normal(0, 6, (height, width, 3))
    top, left = height // 4, width // 5
    bottom, right = height - height // 8, width - width // 5
    wall = np.array(rng.uniform(90, 200, 3))
    img[top:bottom, left:right] = wall
    step_y, step_x = max(4, (bottom - top) // 6), max(4, (right - left) // 7)
    for y in range(top + step_y // 3, bottom - step_y // 2, step_y):
        for x in range(left + step_x // 3, right - step_x // 2, step_x):
            img[y:y + step_y // 2, x:x + step_x // 2] = wall * 0.35
    img[top - height // 10:top, left:right] = wall * 0.6  # roof line
    return np.clip(img, 0, 255).astype(np.uint8)


def ascii_map(attention):
    """The attention map as text, one character per X4 cell (dark = low)."""
    a = np.asarray(attention, np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    return "\n".join("".join(_SHADES[int(v * (len(_SHADES) - 1))] for v in row) for row in a)


def main(argv):
    del argv
    import keras

    from dplg_tf import costs
    from dplg_tf.model import build_dplg

    config = FLAGS.config
    m = config.model
    print(f"dplg_tf demo: backbone={m.backbone} head={m.head} "
          f"descriptor_dim={m.descriptor_dim} (keras {keras.__version__}, "
          f"backend {keras.backend.backend()})")
    model = build_dplg(config)
    image = generated_image(FLAGS.height, FLAGS.width, FLAGS.seed)
    start = time.perf_counter()
    out = model(image[None].astype(np.float32))
    seconds = time.perf_counter() - start
    descriptor = np.asarray(out["descriptor"])[0]
    attention = np.asarray(out["attention"])[0]
    gmacs = costs.count_macs(model, FLAGS.height, FLAGS.width) / 1e9
    print(f"image {FLAGS.height}x{FLAGS.width} -> descriptor {descriptor.shape}, "
          f"L2 norm {np.linalg.norm(descriptor):.6f}, first values "
          f"{np.array2string(descriptor[:6], precision=4)}")
    print(f"attention {attention.shape}, sum {attention.sum():.6f}, "
          f"max {attention.max():.4f} (uniform would be {1 / attention.size:.4f}):")
    print(ascii_map(attention))
    print(f"parameters {model.count_params() / 1e6:.2f} M, {gmacs:.3f} GMACs "
          f"for this image, first call {seconds:.2f} s")
    if FLAGS.output:
        np.savez(FLAGS.output, image=image, descriptor=descriptor, attention=attention)
        print(f"wrote {FLAGS.output}")


def run():
    cli.run(main, "dplg-demo")


if __name__ == "__main__":
    run()

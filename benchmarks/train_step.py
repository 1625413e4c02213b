"""Images/s of one DPLG training step on this machine, per head, in one run.

The step is the trainer's own (dplg_tf.training.optim.build_train_step: ArcFace loss,
all-reduce, clipping, SGD) on an in-memory batch, so the input pipeline is
not measured. Two models: the demo_cpu config (small backbone, 128x128) and
ResNet50 at 224x224; each head's rate is also given as a ratio to `gem`.
With `--backend jax` the step is dplg_tf.training.jax_step's (forward, ArcFace
loss, backward, the same SGD, jitted), which is how a GPU figure is taken
where TensorFlow is not installed; `--bf16` trains in mixed bfloat16.
Usage: python benchmarks/train_step.py [--steps N] [--batch N]
       python benchmarks/train_step.py --backend jax --models resnet50 \
           --heads gem,dplg --image_size 512 --batch 32 --bf16
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import record  # noqa: E402

HEADS = ("gem", "no_rfb", "no_fusion", "dplg", "dolg")


def measure(config, size, batch, steps, warmup):
    import numpy as np
    import tensorflow as tf

    from dplg_tf.nn.model import build_training_model
    from dplg_tf.training.optim import build_train_step, freeze_batchnorm, make_optimizer

    strategy = tf.distribute.get_strategy()
    model = build_training_model(config, num_classes=1000)
    if config.train.frozen_batchnorm:  # as the trainer does
        freeze_batchnorm(model)
    optimizer = make_optimizer(config, model, 1000)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64)
    train_step = build_train_step(strategy, model, optimizer, config.train, batch, step)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    labels = tf.constant(rng.integers(0, 1000, batch).astype("int32"))
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    for _ in range(warmup):
        float(train_step(iterator)[0])
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(iterator)[0]
    float(loss)
    return steps * batch / (time.perf_counter() - start)


def measure_jax(config, size, batch, steps, warmup):
    import numpy as np

    from dplg_tf.training.jax_step import setup

    _, step, state = setup(config, num_classes=1000)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, 1000, batch).astype("int32")
    for _ in range(warmup):
        loss, state = step(state, images, labels)
        float(loss)
    start = time.perf_counter()
    for _ in range(steps):
        loss, state = step(state, images, labels)
    float(loss)
    return steps * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--demo_batch", type=int, default=32)
    parser.add_argument("--backend", choices=("tensorflow", "jax"), default="tensorflow")
    parser.add_argument("--bf16", action="store_true", help="mixed_bfloat16 policy")
    parser.add_argument("--models", default="demo,resnet50")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--image_size", type=int, default=0, help="override both sizes")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend  # before keras is imported
    if args.backend == "jax":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import keras

    from dplg_tf.config import base_config

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import demo_cpu

    if args.bf16:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    run = measure_jax if args.backend == "jax" else measure
    heads = args.heads.split(",")
    models = {"demo": ("demo_cpu (small backbone)", demo_cpu.get_config, 128, args.demo_batch),
              "resnet50": ("resnet50", base_config, 224, args.batch)}
    rows = []
    for key in args.models.split(","):
        name, make, size, batch = models[key]
        size = args.image_size or size
        rates = {}
        for head in heads:
            config = make()
            config.model.head = head
            keras.backend.clear_session()
            rates[head] = run(config, size, batch, args.steps, args.warmup)
            print(f"{name} {head} {size}x{size} batch {batch}: {rates[head]:.1f} img/s", flush=True)
        base = rates.get("gem")
        for head in heads:
            ratio = f"{rates[head] / base:.2f}" if base else "-"
            rows.append(f"| {name} | {size}x{size} | {batch} | {head} | {rates[head]:.1f} | "
                        f"{ratio} |")
    table = "\n".join(["| model | image | batch | head | images/s | vs gem |",
                       "|---|---|---:|---|---:|---:|"] + rows)
    print(table)
    if args.backend != "tensorflow" or args.bf16 or args.image_size:
        precision = "mixed bfloat16" if args.bf16 else "fp32"
        record(f"Training step, {args.backend} backend, {precision}", f"""
{table}

The step of dplg_tf.training.jax_step (or the trainer's) on an in-memory batch, {args.warmup}
warm-up steps, then {args.steps} timed. Command: `python benchmarks/train_step.py
{' '.join(sys.argv[1:])}`.
""")
        return
    record("Training step (benchmarks/train_step.py)", f"""
{table}

fp32, TensorFlow backend, one replica, the trainer's step on an in-memory batch
({args.warmup} warm-up steps, then {args.steps} timed). The heads with an RFB
fall further behind `gem` here than their multiply-adds (README) say; in a
separate micro-benchmark (forward + backward, batch 8, 14x14 maps, TF on this
CPU) the RFB's 5x5 conv (1024->256 channels) took 196 ms and a dilation-5 3x3
conv (256->256, after a 1x1) 235 ms against 101 ms undilated: TF's CPU
dilated convolution is slow. Command:
`python benchmarks/train_step.py --steps {args.steps} --batch {args.batch}`.
""")


if __name__ == "__main__":
    main()

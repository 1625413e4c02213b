"""dplg-train's images/s against its own step on an in-memory batch.

One run, same machine, same records: generates synthetic landmarks (JPEGs,
256x256 by default), builds TFRecords, then runs, each in a fresh process,
(a) the trainer's step (dplg_tf.training.optim.build_train_step) on one in-memory
batch, no strategy, (b) `dplg-train` with 1 and with 2 logical CPU
replicas (MirroredStrategy), and (c) both again with the malloc tuning off
(DPLG_MALLOC_TUNING=0), which is how the trainer ran before it. The
trainer's rate is its own `images_per_sec` (result.json: every logging
window after the first, which holds the compilation); kernel time is the
process's system CPU time over its user + system time (getrusage).
Usage: python benchmarks/train_loop.py [--images 1200] [--steps 60] [--head dplg]
       python benchmarks/train_loop.py --config=configs/finetune_cpu.py --replicas=1 \
           --no_malloc_off   (its own section of RESULTS.md)
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import record  # noqa: E402


def make_records(work, images, size):
    from dplg_tf.data import synthetic, tfrecords

    views = 20
    synthetic.generate(os.path.join(work, "data"), num_landmarks=max(2, images // views),
                       views_per_landmark=views, num_eval_landmarks=1,
                       queries_per_landmark=1, db_per_landmark=3, num_distractors=0,
                       width=size, height=size, seed=0, progress=False)
    items, ignored = tfrecords.list_image_dir(os.path.join(work, "data", "train"))
    shards = os.path.join(work, "shards")
    tfrecords.build(shards, items, num_shards=4, ignored=ignored, progress=False,
                    validation_fraction=0.2)
    return os.path.join(shards, "train-*")


def child_step(args):
    """In a fresh process: the in-memory step's images/s and kernel share."""
    from dplg_tf.training.malloc import keep_freed_memory

    keep_freed_memory()
    from train_step import measure

    config = load_config(args.config)
    config.model.head = args.head or config.model.head
    before = resource.getrusage(resource.RUSAGE_SELF)
    rate = measure(config, config.data.image_size, config.train.batch_size, args.steps, 5)
    print(json.dumps({"images_per_sec": rate, "kernel": _kernel(before)}))


def load_config(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _kernel(before, who=resource.RUSAGE_SELF):
    after = resource.getrusage(who)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return system / max(user + system, 1e-9)


def run_step(args, env):
    out = subprocess.run([sys.executable, __file__, "--child", "step", "--steps",
                          str(args.steps), "--head", args.head, "--config", args.config],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_trainer(args, pattern, work, replicas, env):
    workdir = tempfile.mkdtemp(dir=work, prefix="run_")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "dplg_tf.cli.train", f"--workdir={workdir}",
           f"--config={os.path.join(ROOT, args.config)}",
           f"--cpu_devices={replicas}", f"--config.data.train_pattern={pattern}",
           f"--config.train.max_steps={args.steps}",
           "--config.train.log_every=10", "--config.train.checkpoint_every=100000"]
    if args.head:
        cmd.append(f"--config.model.head={args.head}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"dplg-train failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "result.json")) as f:
        result = json.load(f)
    return {"images_per_sec": result["images_per_sec"], "kernel": _kernel(
        before, resource.RUSAGE_CHILDREN), "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--head", default="", help="Default: the config's.")
    parser.add_argument("--config", default="configs/demo_cpu.py")
    parser.add_argument("--replicas", default="1,2", help="Logical CPU replicas to run.")
    parser.add_argument("--no_malloc_off", dest="malloc_off", action="store_false",
                        help="Skip the runs with the malloc tuning off.")
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child == "step":
        return child_step(args)

    work = tempfile.mkdtemp(prefix="dplg_train_loop_")
    try:
        pattern = make_records(work, args.images, args.size)
        rows = []
        for tuned in (True, False) if args.malloc_off else (True,):
            env = dict(os.environ, DPLG_MALLOC_TUNING="1" if tuned else "0")
            step = run_step(args, env)
            label = "on" if tuned else "off"
            rows.append((f"in-memory step, no strategy (malloc tuning {label})", step, 1.0))
            replicas_list = [int(r) for r in args.replicas.split(",")]
            for replicas in replicas_list:
                r = run_trainer(args, pattern, work, replicas, env)
                rows.append((f"`dplg-train --cpu_devices={replicas}` (malloc tuning {label})",
                             r, r["images_per_sec"] / step["images_per_sec"]))
            for name, r, ratio in rows[-1 - len(replicas_list):]:
                print(f"{name}: {r['images_per_sec']:.1f} img/s, {ratio:.2f}x the step, "
                      f"kernel {100 * r['kernel']:.0f}% of CPU time", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(["| what | images/s | vs the step (same tuning) | kernel share of CPU |",
                       "|---|---:|---:|---:|"] + [
        f"| {name} | {r['images_per_sec']:.1f} | {ratio:.2f} | {100 * r['kernel']:.0f}% |"
        for name, r, ratio in rows])
    print(table)
    config = load_config(args.config)
    name = os.path.splitext(os.path.basename(args.config))[0]
    section = "Training loop (benchmarks/train_loop.py)" if name == "demo_cpu" else \
        f"Training loop, {name} (benchmarks/train_loop.py)"
    command = " ".join(sys.argv[1:])
    record(section, f"""
{table}

{name} config, head `{args.head or config.model.head}`, batch {config.train.batch_size} at
{config.data.image_size}x{config.data.image_size}, {args.steps} steps, on
TFRecords of {args.images} synthetic {args.size}x{args.size} JPEGs. The trainer's
images/s are over the logging windows after the first (compilation excluded); the
step's after 5 warm-up steps. Kernel share: the whole process, start-up included.
Command: `python benchmarks/train_loop.py {command}`.
""")


if __name__ == "__main__":
    main()
